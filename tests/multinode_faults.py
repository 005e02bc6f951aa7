"""Fault cases on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a
head without CPUs and two worker nodes with their own resources), run by ``test_multinode.py``
in a process of their own; S3 (the ``AWS_*`` variables) is the only storage the nodes share.

    python tests/multinode_faults.py CASE WORKDIR_URI LOCAL_DIR

Each case runs the job once undisturbed and once disturbed on the same cluster and prints one
JSON line, ``RESULT {...}``, that the test compares.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import build_tiny_model, clustered_vectors  # noqa: E402
from pipeline.distributed.train import DistTrainConfig, run_distributed_training  # noqa: E402
from pipeline.codec.model import QincoConfig  # noqa: E402
from pipeline.index.manifest import load_manifest, version_dir  # noqa: E402
from pipeline.io import results, storage, vectors  # noqa: E402
from pipeline.search.params import SearchParams  # noqa: E402
from pipeline.stages.encode import EncodeJobConfig, run_encode  # noqa: E402
from pipeline.stages.search import run_search, SearchJobConfig  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402

NODE_CPUS = 2
EPOCHS = 12


def start_cluster() -> Cluster:
    """A head that runs no tasks and two worker nodes; this process is the driver."""
    env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)  # the workers' logs show the restarts
    return cluster


def _alive(class_part: str) -> list:
    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
            if class_part in (a.class_name or "")]


def remove_node_of(cluster: Cluster, class_part: str) -> str:
    """Remove the worker node that hosts a live actor whose class name contains ``class_part``."""
    actors = _alive(class_part)
    if not actors:
        raise RuntimeError(f"no live {class_part} actor")
    node_id = actors[0].node_id
    for node in list(cluster.worker_nodes):
        if node.node_id == node_id:
            cluster.remove_node(node, allow_graceful=False)
            return node_id
    raise RuntimeError(f"node {node_id} of {class_part} is not a worker node")


def _shard_count(index_uri: str, version: str = "v000001") -> int:
    shards = storage.join(version_dir(index_uri, version), "shards")
    return sum(1 for u in storage.list_files(shards) if u.endswith(".parquet"))


def _manifest_summary(index_uri: str) -> dict:
    m = load_manifest(index_uri)
    return {"shards": [(s.name, s.rows, s.sha256, s.id_min, s.id_max, s.lists) for s in m.shards],
            "total_rows": m.total_rows, "inputs": [i.key() for i in m.inputs]}


def prepare(work: str, local: str, n: int) -> dict:
    x = clustered_vectors(n, 16, seed=1)
    q = clustered_vectors(4000, 16, seed=3)
    model = storage.join(work, "model")
    build_tiny_model(model, clustered_vectors(3000, 16, seed=2))
    base, query = storage.join(work, "base.fvecs"), storage.join(work, "query.fvecs")
    vectors.write_vectors(base, x)
    vectors.write_vectors(query, q)
    return {"model": model, "base": base, "query": query}


def case_encode(cluster: Cluster, work: str, local: str) -> dict:
    """A worker node that hosts an encode actor is removed mid-job."""
    inp = prepare(work, local, 60000)

    def job(index):
        return EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index, workers=2,
                               cpus_per_worker=0.5, shard_rows=1500, batch_size=64)

    plain = storage.join(work, "index-plain")
    t0 = time.time()
    run_encode(job(plain))
    plain_s = time.time() - t0
    hit = storage.join(work, "index-hit")
    state: dict = {}

    def disturb():
        while _shard_count(hit) < 4:
            time.sleep(0.2)
        state["shards_before"] = _shard_count(hit)
        state["actors"] = sorted({a.class_name for a in _alive("")})
        state["node"] = remove_node_of(cluster, "MapWorker")
        state["shards_at_removal"] = _shard_count(hit)

    th = _in_thread(disturb, state)
    report = run_encode(job(hit))
    th.join(timeout=60)
    return {"plain": _manifest_summary(plain), "hit": _manifest_summary(hit), "status": report["status"],
            "total_shards": len(load_manifest(hit).shards), "plain_s": plain_s, **state}


def case_search(cluster: Cluster, work: str, local: str) -> dict:
    """A worker node that hosts a shard actor is removed while the query job runs."""
    inp = prepare(work, local, 20000)
    index = storage.join(work, "index")
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index, workers=2,
                               cpus_per_worker=0.5, shard_rows=5000))

    def search(out):
        return run_search(SearchJobConfig(index_uri=index, queries_uri=inp["query"], out_uri=out,
                                          params=SearchParams(k=10, nprobe=4, shortlist=50), workers=2,
                                          cpus_per_worker=0.5, query_batch=50))

    plain_out, hit_out = storage.join(work, "res-plain"), storage.join(work, "res-hit")
    search(plain_out)
    state: dict = {}

    def disturb():
        while len(_alive("ShardActor")) < 2:
            time.sleep(0.1)
        time.sleep(1.0)  # loaded and answering batches
        state["node"] = remove_node_of(cluster, "ShardActor")  # its actor restarts on the other node

    th = _in_thread(disturb, state)
    report = search(hit_out)
    th.join(timeout=60)
    I0, D0 = results.read_results(plain_out)
    I1, D1 = results.read_results(hit_out)
    return {"same_ids": bool((I0 == I1).all()), "max_dist_diff": float(np.abs(D0 - D1).max()),
            "failed_shards": report["failed_shards"], "queries": report["queries"],
            "search_s": report["search_s"], **state}


def case_train(cluster: Cluster, work: str, local: str) -> dict:
    """A Ray Train worker process is killed (SIGKILL) in the middle of an epoch. Two undisturbed
    runs give the reference: runs differ by a percent or two anyway, since the order in which
    Ray Data hands blocks to the workers is not fixed."""
    x = clustered_vectors(24000, 16, seed=5)
    data = storage.join(work, "learn.fvecs")
    vectors.write_vectors(data, x)
    q = QincoConfig(dim=1, M=4, K=16, L=1, de=16, dh=32, A=4, B=2, nlist=0).to_dict()
    q["dim"] = None
    t = TrainConfig(epochs=EPOCHS, batch_size=256, lr=2e-3, warmup_steps=10, val_size=1000, rq_iters=4)

    def cfg(out):
        return DistTrainConfig(data_uris=[data], out_uri=out, qinco=q, train=t.to_dict(), workers=2,
                               cpus_per_worker=0.5, rows_per_task=4000, init_rows=4000, ivf_niter=10,
                               max_failures=2)

    t0 = time.time()
    plain = [run_distributed_training(cfg(storage.join(work, f"model-plain{i}")))["best_val_mse"] for i in range(2)]
    plain_s = (time.time() - t0) / 2
    hit_out = storage.join(work, "model-hit")
    state: dict = {}

    def disturb():
        # after the first epoch's checkpoint, a few seconds into the second epoch
        ckpt = storage.join(hit_out, "checkpoints", "train")
        while not any("checkpoint_" in u for u in _list(ckpt)):
            time.sleep(0.2)
        time.sleep(2.0)
        before = {a.pid for a in _alive("RayTrainWorker")}
        state["model_written_before_kill"] = storage.exists(storage.join(hit_out, "model.safetensors"))
        state["killed_pid"] = min(before)
        os.kill(state["killed_pid"], signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline:  # FailureConfig: a new worker group starts from the checkpoint
            new = {a.pid for a in _alive("RayTrainWorker")} - before
            if new:
                state["new_worker_pids"] = sorted(new)
                return
            time.sleep(0.5)

    th = _in_thread(disturb, state)
    hit = run_distributed_training(cfg(hit_out))
    th.join(timeout=60)
    return {"plain_val_mse": plain, "hit_val_mse": hit["best_val_mse"], "status": hit["status"],
            "epochs_done": hit["epochs_done"], "plain_s": plain_s, **state}


def _in_thread(fn, state: dict) -> threading.Thread:
    """Run ``fn`` beside the job; its error, if any, is reported in ``state["disturb_error"]``."""
    def body():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            state["disturb_error"] = f"{type(e).__name__}: {e}"

    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th


def _list(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except Exception:  # noqa: BLE001 - not created yet
        return []


CASES = {"encode": case_encode, "search": case_search, "train": case_train}


def main() -> None:
    case, work, local = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cluster = start_cluster()
    try:
        out = CASES[case](cluster, work, local)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
