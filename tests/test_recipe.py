"""The default training recipe (``qinco train`` without ``--preset``) and ``--sample-from``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.codec.model_file import read_model_info
from pipeline.errors import ConfigError
from pipeline.io import vectors
from pipeline.stages import train as train_stage
from pipeline.stages.datasets import clustered_vectors
from pipeline.train.config import TrainConfig
from pipeline.train.recipe import apply_recipe, choose_recipe, network_weights, resolve_model
from pipeline.train.setup import rows_not_in

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _weights(r) -> int:
    return network_weights(r.dim, r.M, r.model["de"], r.model["dh"], r.model["L"])


def test_a_tiny_learn_set_gets_a_smaller_model_than_a_large_one():
    small, large = choose_recipe(5_000, 384, 8), choose_recipe(2_000_000, 384, 8)
    assert _weights(small) < _weights(large)
    for r in (small, large):
        assert f"{r.n_train:,}" in r.reasons["network"]
    # wider still on a GPU, never wider on the CPU than it trains in a budget
    assert _weights(choose_recipe(2_000_000, 384, 8, device="cuda")) > _weights(large)
    assert choose_recipe(10**9, 384, 8).model == large.model
    # the choice follows the data per weight: the widest rung that the data allow
    assert _weights(large) <= 2_000_000 * 384 / 8


def test_the_users_options_win_over_the_recipe_and_are_recorded():
    tcfg = TrainConfig(lr=5e-3, batch_size=256)
    qcfg, tcfg2, rec = apply_recipe(choose_recipe(50_000, 64, 4), {"de": 16, "A": None}, tcfg,
                                    explicit_train={"lr"})
    assert qcfg.de == 16 and qcfg.A == 8 and qcfg.M == 4
    assert tcfg2.lr == 5e-3 and tcfg2.batch_size == 1024  # batch: the recipe's; lr: given
    assert rec.overridden == {"de": 16, "lr": 5e-3}
    # an expert preset is taken as it is
    qcfg, tcfg3, rec = resolve_model("cpu", 64, 50_000, {"M": 4}, tcfg)
    assert rec is None and qcfg.de == 64 and qcfg.B == 4 and tcfg3 == tcfg


def test_rows_equal_to_a_validation_row_are_found_bit_for_bit():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    ref = np.stack([x[1], x[3] + 1e-6])
    assert rows_not_in(x, ref).tolist() == [True, False, True, True]


@pytest.fixture
def learn_and_base(tmp_path):
    learn = clustered_vectors(1500, 8, seed=5, stream=0)
    fresh = clustered_vectors(900, 8, seed=5, stream=1)
    # the base repeats every learn vector (some are validation rows) and holds new ones
    base = np.concatenate([fresh[:500], learn, fresh[500:]])
    uris = {"learn": str(tmp_path / "learn.fvecs"), "base": str(tmp_path / "base.npy")}
    vectors.write_vectors(uris["learn"], learn)
    vectors.write_vectors(uris["base"], base)
    return uris, learn, base


def test_training_on_learn_and_base_never_uses_the_validation_rows(learn_and_base, tmp_path, monkeypatch, capsys):
    uris, learn, base = learn_and_base
    seen = {}
    real = train_stage.train_model

    def spy(x_train, x_val, *args, **kw):
        seen["train"], seen["val"], seen["init"] = x_train.copy(), x_val.copy(), kw["x_init_ND"].copy()
        return real(x_train, x_val, *args, **kw)

    monkeypatch.setattr(train_stage, "train_model", spy)
    out = tmp_path / "model"
    assert main(["train", "--data", uris["learn"], "--sample-from", uris["base"], "--out", str(out),
                 "--bytes", "1", "--K", "16", "--val", "200", "--epochs", "1"]) == 0
    x_train, x_val = seen["train"], seen["val"]
    assert len(x_val) == 200
    # no training or set-up row equals a validation row, although the base holds them all
    assert rows_not_in(x_train, x_val).all() and rows_not_in(seen["init"], x_val).all()
    # the learn rows of the training band, and the whole base but its copies of validation rows
    data = read_model_info(str(out))["metadata"]["data"]
    assert data["sample_from"]["dropped_equal_to_validation"] == 200
    assert data["sample_from"]["rows"] == len(base) - 200 and data["train_rows"] == len(x_train)
    assert 1200 <= len(x_train) - (len(base) - 200) <= len(learn) - 200
    # the recipe was chosen from all of those rows, and says so
    rec = read_model_info(str(out))["metadata"]["recipe"]
    assert rec["n_train"] == len(x_train) and rec["M"] == 2 and f"{len(x_train):,}" in rec["reasons"]["network"]
    assert "network:" in capsys.readouterr().out


def test_train_without_a_preset_records_the_recipe_it_chose(learn_and_base, tmp_path):
    uris, _, _ = learn_and_base
    out = tmp_path / "m"
    assert main(["train", "--data", uris["learn"], "--out", str(out), "--M", "2", "--K", "16", "--val", "200",
                 "--epochs", "1", "--de", "16"]) == 0
    info = read_model_info(str(out))
    rec = info["metadata"]["recipe"]
    cfg = info["config"]
    assert info["metadata"]["preset"] == "auto"
    assert cfg["de"] == 16 and rec["overridden"] == {"de": 16}
    assert {k: cfg[k] for k in ("dh", "L", "A", "B", "B_train")} == {k: rec["model"][k] for k in ("dh", "L", "A", "B", "B_train")}
    assert info["metadata"]["train_config"]["lr"] == rec["train"]["lr"]
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == rec


def test_bytes_and_m_must_agree_and_presets_are_known(learn_and_base, tmp_path, capsys):
    uris, _, _ = learn_and_base
    assert main(["train", "--data", uris["learn"], "--out", str(tmp_path / "m"), "--bytes", "8", "--M", "4"]) == 2
    assert "bytes 8 means M 8" in capsys.readouterr().err
    assert main(["train", "--data", uris["learn"], "--out", str(tmp_path / "m"), "--preset", "big"]) == 2
    assert "unknown preset 'big'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        resolve_model("nope", 8, 10, {}, TrainConfig())


def test_input_noise_where_the_training_set_is_small_for_the_codebooks():
    noise = {n: choose_recipe(n, 384, 8).train["input_noise"] for n in (5_000, 20_000, 30_000, 60_000, 10**6)}
    assert noise[5_000] == noise[20_000] == 1.0 and noise[60_000] == noise[10**6] == 0.0
    assert 0 < noise[30_000] < 1
    assert choose_recipe(30_000, 384, 16).train["input_noise"] == 1.0  # more codewords, fewer rows each
    assert "per codeword" in choose_recipe(30_000, 384, 8).reasons["input_noise"]
    # the user's value wins and is recorded
    _, tcfg, rec = apply_recipe(choose_recipe(5_000, 384, 8), {}, TrainConfig(input_noise=0.0),
                                explicit_train={"input_noise"})
    assert tcfg.input_noise == 0.0 and rec.overridden == {"input_noise": 0.0}


def test_ivf_auto_picks_the_lists_by_the_number_of_vectors():
    from pipeline.codec.ivf import AUTO_FLAT_BELOW, auto_nlist

    assert auto_nlist(AUTO_FLAT_BELOW - 1, 10**6)[0] == 0
    assert "flat" in auto_nlist(AUTO_FLAT_BELOW - 1, 10**6)[1]
    for n in (AUTO_FLAT_BELOW, 290_000, 10**6, 10**7, 10**9):
        nlist, why = auto_nlist(n, 10**9)
        assert nlist & (nlist - 1) == 0 and 4 <= nlist / n ** 0.5 <= 16, (n, nlist)
        assert f"{n:,}" in why
    assert auto_nlist(10**6, 10**9)[0] == 8192 and auto_nlist(10**9, 10**9)[0] == 262_144
    # the k-means sample caps it at 39 points per list (Faiss's minimum)
    nlist, why = auto_nlist(10**9, 100_000)
    assert nlist == 2048 and 100_000 / nlist >= 39 and "k-means" in why
    # more vectors never fewer lists
    got = [auto_nlist(n, 10**9)[0] for n in np.geomspace(AUTO_FLAT_BELOW, 10**10, 40).astype(int)]
    assert got == sorted(got)


def test_train_with_ivf_auto_is_flat_for_few_vectors_and_ivf_for_many(learn_and_base, tmp_path, capsys,
                                                                      monkeypatch):
    """``--ivf auto`` (the default) tells the user what it chose: a flat index for 1,500 vectors,
    and, with the threshold lowered below them, IVF lists from the vectors of --data and --sample-from."""
    from pipeline.codec import ivf

    uris, _, _ = learn_and_base
    common = ["--M", "2", "--K", "16", "--val", "200", "--epochs", "1", "--de", "16"]
    assert main(["train", "--data", uris["learn"], "--out", str(tmp_path / "flat")] + common) == 0
    assert "IVF (--ivf auto): 0 lists (a flat index" in capsys.readouterr().out
    assert read_model_info(str(tmp_path / "flat"))["config"]["nlist"] == 0
    monkeypatch.setattr(ivf, "AUTO_FLAT_BELOW", 1000)
    out = tmp_path / "ivf"
    assert main(["train", "--data", uris["learn"], "--sample-from", uris["base"], "--out", str(out)] + common) == 0
    n_index = vectors.info(uris["learn"]).count + vectors.info(uris["base"]).count
    info = read_model_info(str(out))
    expect = ivf.auto_nlist(n_index, info["metadata"]["data"]["init_rows"])
    assert info["config"]["nlist"] == expect[0] > 0 and info["metadata"]["ivf_auto"] == expect[1]
    assert f"IVF (--ivf auto): {expect[1]}" in capsys.readouterr().out
    # a number is taken as given
    assert main(["train", "--data", uris["learn"], "--out", str(tmp_path / "n4"), "--ivf", "4"] + common) == 0
    assert read_model_info(str(tmp_path / "n4"))["config"]["nlist"] == 4
