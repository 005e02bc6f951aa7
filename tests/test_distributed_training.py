"""Ray Train fitting: S3 input and checkpoints, pause/resume, DDP vs one worker, bad inputs, IVF.

Four Ray Train runs in all (shared through module fixtures): a 2-worker run on S3 stopped after
its first epoch and resumed, a 1-worker run on the same data, and (with dwsift) an IVF run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import clustered_vectors, data_dir
from pipeline.io import storage, vectors
from pipeline.codec.model_file import load_model, read_model_info
from pipeline.codec.encoder import reconstruct
from pipeline.codec.decoder import reconstruction_mse
from pipeline.distributed.train import DistTrainConfig, run_dir, run_distributed_training
from pipeline.errors import ConfigError, StorageError, VectorFormatError
from pipeline.codec.model import QincoConfig
from pipeline.train.config import TrainConfig

pytestmark = pytest.mark.ray

N_ROWS = 8000
EPOCHS = 4


def _dataset() -> tuple[np.ndarray, str]:
    """The first rows of dwsift learn (uint8, D=128) when present, else clustered float32 (D=16)."""
    path = data_dir() / "dwsift" / "learn.bvecs"
    if path.exists():
        return vectors.read_vectors(str(path), max_rows=N_ROWS), "dwsift"
    return clustered_vectors(N_ROWS, 16, seed=5), "synthetic"


def _cfg(data_uris, out_uri, workers, nlist=0, **train_kw) -> DistTrainConfig:
    q = QincoConfig(dim=1, M=4, K=16, L=1, de=16, dh=32, A=4, B=2, nlist=nlist).to_dict()
    q["dim"] = None
    t = TrainConfig(epochs=EPOCHS, batch_size=256, lr=2e-3, warmup_steps=10, val_size=1000,
                    rq_iters=4, **train_kw)
    return DistTrainConfig(data_uris=list(data_uris), out_uri=out_uri, qinco=q, train=t.to_dict(),
                           workers=workers, cpus_per_worker=0.5, rows_per_task=2000, init_rows=4000,
                           ivf_niter=10, max_failures=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x, name = _dataset()
    d = tmp_path_factory.mktemp("dist_train")
    ext = "bvecs" if x.dtype == np.uint8 else "fvecs"
    local = str(d / f"learn.{ext}")
    vectors.write_vectors(local, x)
    return {"x": x, "name": name, "local": local, "ext": ext, "dir": d}


@pytest.fixture(scope="module")
def s3_run(ray_session, s3, data):
    """2 workers, data and checkpoints on S3: stopped after epoch 1, then the same call again."""
    bucket = s3.bucket("dist-train")
    src = f"{bucket}/data/learn.{data['ext']}"
    storage.write_bytes_atomic(src, open(data["local"], "rb").read(), s3.options())
    cfg = _cfg([src], f"{bucket}/model", workers=2)
    first = run_distributed_training(cfg.replace(stop_after_epochs=1), options=s3.options())
    second = run_distributed_training(cfg, options=s3.options())
    return {"cfg": cfg, "first": first, "second": second, "src": src, "options": s3.options()}


@pytest.fixture(scope="module")
def one_worker_run(ray_session, data):
    return run_distributed_training(_cfg([data["local"]], str(data["dir"] / "model1"), workers=1))


def test_stopped_run_resumes_at_next_epoch_from_s3_checkpoint(s3_run, data):
    first, second, opts = s3_run["first"], s3_run["second"], s3_run["options"]
    assert first["status"] == "paused" and first["epochs_done"] == 1
    assert [h["epoch"] for h in first["history"]] == [1]
    assert second["status"] == "trained" and second["epochs_done"] == EPOCHS
    # continued, not restarted: epoch 1's record is the one written by the first invocation
    assert [h["epoch"] for h in second["history"]] == list(range(1, EPOCHS + 1))
    assert second["history"][0]["val_mse"] == first["history"][0]["val_mse"]
    assert second["history"][0]["seconds"] == first["history"][0]["seconds"]
    assert all(h["workers"] == 2 and h["samples_per_s_all_workers"] > 0 for h in second["history"])
    ckpts = [f for f in storage.list_files(run_dir(s3_run["cfg"]), opts) if f.endswith("/trainer.pt")]
    assert ckpts, "no checkpoint written to S3"

    model_uri = s3_run["cfg"].out_uri
    info = read_model_info(model_uri, opts)
    meta = info["metadata"]
    assert info["has_additive"] and not info["has_centroids"]
    assert info["config"]["dim"] == data["x"].shape[1] and info["code_version"]["package"] == "qinco-pipeline"
    report = json.loads(storage.read_bytes(storage.join(model_uri, "report.json"), opts))
    assert report["job"] == "train" and report["epochs_done"] == EPOCHS and report["workers"] == 2
    inp = meta["provenance"]["inputs"][0]
    assert inp["uri"] == s3_run["src"] and inp["count"] == N_ROWS and len(inp["header_sha256"]) == 64
    assert [h["epoch"] for h in meta["metrics"]["history"]] == list(range(1, EPOCHS + 1))
    # the saved model is the best epoch's and its validation MSE is reproducible from held-out rows
    model = load_model(model_uri, options=opts)
    assert min(h["val_mse"] for h in second["history"]) == pytest.approx(second["best_val_mse"])
    x = data["x"].astype(np.float32)
    mse = reconstruction_mse(x[:2000], reconstruct(model, x[:2000]))
    assert mse < 1.5 * second["best_val_mse"]


def _gain(cfg, x, options=None) -> tuple[float, float]:
    """(MSE of the run's RQ initialisation, MSE of its trained model) on the same 2,000 rows."""
    from pipeline.distributed.train import initial_model

    model = load_model(cfg.out_uri, options=options)
    init = initial_model(cfg, model.config, options)
    xs = x[:2000].astype(np.float32)
    return reconstruction_mse(xs, reconstruct(init, xs)), reconstruction_mse(xs, reconstruct(model, xs))


def _assert_same_gain(run_a, run_b):
    """Two trainings of the same data and hyper-parameters differ in their batches (how the rows
    reach the workers), and their errors differ by that run-to-run amount: after two epochs from
    an initialisation as good as Faiss RQ, one worker's gain on the synthetic fallback data was
    42-60% of two workers' (a first epoch above the initialisation); after four, 95%. What DDP must give is a single worker's progress:
    both runs start from the same RQ initialisation, both improve on it, and neither gain is
    below 60% of the other (a run whose workers did not share their gradients, or that trained
    on nothing, fails)."""
    (init_a, mse_a), (init_b, mse_b) = run_a, run_b
    assert init_a == pytest.approx(init_b, rel=1e-6)  # the same initialisation
    gain_a, gain_b = init_a - mse_a, init_b - mse_b
    assert min(gain_a, gain_b) > 0.02 * init_a, (run_a, run_b)
    assert min(gain_a, gain_b) >= 0.6 * max(gain_a, gain_b), (run_a, run_b)


def test_two_workers_match_one_worker(s3_run, one_worker_run, data):
    assert one_worker_run["epochs_done"] == EPOCHS
    one_cfg = _cfg([data["local"]], str(data["dir"] / "model1"), workers=1)
    _assert_same_gain(_gain(s3_run["cfg"], data["x"], s3_run["options"]), _gain(one_cfg, data["x"]))


def test_workers_holding_most_cpus_still_stream_their_data(ray_session, data, one_worker_run):
    """Two workers of 0.75 CPU on the 2-CPU session leave 0.5 CPU: the read tasks that stream the
    training data ask for less than that (with Ray's default of one CPU they waited forever)."""
    cfg = _cfg([data["local"]], str(data["dir"] / "model_busy"), workers=2).replace(cpus_per_worker=0.75)
    run = run_distributed_training(cfg)
    assert run["epochs_done"] == EPOCHS
    one_cfg = _cfg([data["local"]], str(data["dir"] / "model1"), workers=1)
    _assert_same_gain(_gain(cfg, data["x"]), _gain(one_cfg, data["x"]))


def test_resumed_run_with_other_hyper_parameters_is_refused(s3_run):
    cfg = s3_run["cfg"]
    changed = cfg.replace(train={**cfg.train, "lr": 1e-3})
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.002 -> 0\.001"):
        run_distributed_training(changed, options=s3_run["options"])
    with pytest.raises(ConfigError, match="different qinco"):
        run_distributed_training(cfg.replace(qinco={**cfg.qinco, "M": 8}), options=s3_run["options"])


def test_bad_inputs_fail_before_training(s3_run, data, tmp_path):
    opts = s3_run["options"]
    bucket = s3_run["src"].split("/data/")[0]
    other_dim = f"{bucket}/data/other.fvecs"
    vectors.write_vectors(other_dim, clustered_vectors(3000, 24), options=opts)
    cfg = s3_run["cfg"]
    with pytest.raises(ConfigError, match=r"other\.fvecs.*dimension 24.*trained on dimension"):
        run_distributed_training(cfg.replace(data_uris=[other_dim]), options=opts)

    empty = tmp_path / "empty.fvecs"
    empty.write_bytes(b"")
    out = str(tmp_path / "never")
    with pytest.raises(VectorFormatError, match="empty.fvecs"):
        run_distributed_training(_cfg([str(empty)], out, workers=1))
    corrupt = tmp_path / "corrupt.fvecs"
    vectors.write_vectors(str(corrupt), clustered_vectors(100, 16))
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # truncated inside a record (68 bytes each)
    with pytest.raises(VectorFormatError, match="corrupt.fvecs"):
        run_distributed_training(_cfg([str(corrupt)], out, workers=1))
    mixed = _cfg([data["local"], other_dim], out, workers=1)
    with pytest.raises(ConfigError, match=r"other\.fvecs.*dimension 24"):
        run_distributed_training(mixed, options=opts)
    with pytest.raises(StorageError, match="no-such-bucket"):
        run_distributed_training(_cfg(["s3://no-such-bucket/x.fvecs"], out, workers=1), options=opts)
    assert not (tmp_path / "never").exists()  # nothing written, no run started


def test_ivf_beats_plain_at_equal_code_bytes(one_worker_run, data, dwsift_dir):
    assert data["name"] == "dwsift"
    ivf = run_distributed_training(_cfg([data["local"]], str(data["dir"] / "model_ivf"), workers=1, nlist=64))
    assert ivf["code_bytes"] == one_worker_run["code_bytes"]
    info = read_model_info(str(data["dir"] / "model_ivf"))
    assert info["has_centroids"] and info["config"]["nlist"] == 64
    assert ivf["best_val_mse"] < 0.9 * one_worker_run["best_val_mse"], (ivf["best_val_mse"],
                                                                      one_worker_run["best_val_mse"])
    json.dumps(ivf, default=str)


def test_driver_and_ray_data_samples_are_the_same_rows(ray_session, data):
    from pipeline.distributed.train import draw_samples
    from pipeline.io.inputs import plan_inputs
    from pipeline.train.setup import SplitPlan

    inputs = plan_inputs([data["local"]])
    plan = SplitPlan(total=sum(i.count for i in inputs), seed=7, val_fraction=0.1, train_fraction=0.9,
                     init_fraction=0.3, n_val=300, n_init=1500)
    v_local, i_local = draw_samples(inputs, plan, 1000, None, local_bytes=1 << 40)
    v_ray, i_ray = draw_samples(inputs, plan, 1000, None, local_bytes=0)
    assert v_local.shape == (300, data["x"].shape[1]) and i_local.shape == (1500, data["x"].shape[1])
    np.testing.assert_array_equal(v_local, v_ray)
    np.testing.assert_array_equal(i_local, i_ray)
    # disjoint: no validation row is used to initialise (rows are distinct in this data)
    rows = {r.tobytes() for r in v_local}
    assert not any(r.tobytes() in rows for r in i_local)


def test_both_trainers_train_validate_and_initialise_on_the_same_rows(ray_session, data):
    """`qinco train --workers 0` (read_split_local) and the Ray Train run (draw_samples, then the
    training band streamed by Ray Data) pick the same validation, initialisation and training rows."""
    from pipeline.distributed.datasource import VectorDatasource, read_source
    from pipeline.distributed.train import draw_samples
    from pipeline.io.inputs import plan_inputs
    from pipeline.train.config import TrainConfig
    from pipeline.train.setup import plan_split, read_split_local

    inputs = plan_inputs([data["local"]])
    total = sum(i.count for i in inputs)
    plan = plan_split(total, TrainConfig(val_size=300, seed=3), init_rows=1000)
    x_val, x_init, x_train = read_split_local(inputs, plan)
    v_ray, i_ray = draw_samples(inputs, plan, 700, None, local_bytes=0)
    np.testing.assert_array_equal(x_val, v_ray)
    np.testing.assert_array_equal(x_init, i_ray)
    train_s, _ = plan.samples()
    ids, xs = [], []
    for b in read_source(VectorDatasource(inputs, rows_per_task=700, sample=train_s),
                         num_cpus=0.5).iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(b["id"])
        xs.append(b["vector"])
    order = np.argsort(np.concatenate(ids))
    np.testing.assert_array_equal(np.concatenate(xs)[order].astype(np.float32), x_train)
    assert len(x_val) == 300 and len(x_init) == 1000 and len(x_train) > total - 2 * 300
    rows = {r.tobytes() for r in x_val}
    assert not any(r.tobytes() in rows for r in x_train)


def test_the_default_recipe_is_chosen_from_the_planned_rows(ray_session, data):
    """`qinco train --workers N` without --preset: the job picks the recipe once it knows the
    training rows, trains that model and records the choice; the user's options win."""
    from pipeline.train.recipe import AUTO, choose_recipe
    from pipeline.train.setup import plan_split

    cfg = _cfg([data["local"]], str(data["dir"] / "model_auto"), workers=1)
    t = TrainConfig.from_dict(cfg.train).replace(epochs=1)
    cfg = cfg.replace(qinco={"M": 4, "K": 16, "de": 16, "dim": None}, preset=AUTO, train=t.to_dict(),
                      explicit_train=["batch_size"])
    summary = run_distributed_training(cfg)
    assert summary["status"] == "trained"
    info = read_model_info(cfg.out_uri)
    rec = info["metadata"]["recipe"]
    n_train = plan_split(len(data["x"]), t, cfg.init_rows).n_train_estimate
    expected = choose_recipe(n_train, data["x"].shape[1], 4, 16)
    assert rec["n_train"] == n_train and rec["model"] == expected.model and rec["overridden"] == {"de": 16, "batch_size": 256}
    assert info["config"]["de"] == 16 and info["config"]["dh"] == expected.model["dh"]
    assert info["config"]["B"] == expected.model["B"]
    assert info["metadata"]["train_config"]["batch_size"] == 256
    assert info["metadata"]["train_config"]["lr"] == expected.train["lr"]
