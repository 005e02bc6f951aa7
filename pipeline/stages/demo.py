"""The end-to-end demo job behind ``qinco demo``.

It runs a list of named stages over one shared state and prints how long each took. The data
is the real ``dwsift`` set when it is available (subsampled so the demo stays short), otherwise a
small synthetic clustered set written into the output folder. After the Faiss baselines it runs
the production path on the embedded default (a local Ray, a local folder as the object store):
train an IVF-QINCo2 model, encode the base into index shards with the Ray encode job, answer the
queries with the Ray search job, measure recall against the exact ground truth next to the
baselines, and print the index's history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import numpy as np
import ray

from pipeline.codec.model import config_from_preset
from pipeline.codec.model_file import save_model
from pipeline.config import JsonConfig, code_version
from pipeline.distributed.cluster import ensure_ray
from pipeline.errors import PipelineError
from pipeline.index.history import format_report, index_report
from pipeline.index.manifest import garbage_collect
from pipeline.io import storage, vectors
from pipeline.search.evaluation import knn_ground_truth
from pipeline.search.params import SearchParams
from pipeline.stages.baselines import format_table, run_baselines
from pipeline.stages.datasets import make_synthetic, resolve_dataset
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.search import evaluate_results, run_search, SearchJobConfig
from pipeline.sysinfo import machine_info
from pipeline.train.config import default_lr, TrainConfig
from pipeline.train.loop import train_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig(JsonConfig):
    """Sizes of the demo run; ``quick`` sizes keep it to a few seconds."""

    n_learn: int = 10_000
    n_base: int = 50_000
    n_query: int = 1_000
    n_check: int = 100          # queries whose shipped ground truth is re-derived over the full base
    code_bytes: int = 8
    methods: tuple = ("PQ", "RQ")
    k: int = 100
    seed: int = 1234
    nlist: int = 64             # IVF lists of the QINCo model
    train_epochs: int = 30
    train_time_s: float = 60.0  # training stops after this many seconds
    rq_iters: int = 10          # k-means iterations of the RQ initialisation
    n_val: int = 1_000
    workers: int = 2            # encode and search actors
    shard_rows: int = 12_500
    nprobe: int = 16
    shortlist: int = 200        # candidates re-ranked with the QINCo decoder

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoConfig":
        if quick:
            return cls(n_learn=1_000, n_base=2_000, n_query=100, n_check=10, nlist=8, train_epochs=2,
                       train_time_s=20.0, rq_iters=3, n_val=200, shard_rows=1_000, nprobe=4)
        return cls()


@dataclasses.dataclass
class DemoState:
    """What the stages read and write."""

    config: DemoConfig
    out: str
    data_dir: str | None
    dataset: Any = None                       # pipeline.stages.datasets.Dataset
    learn: np.ndarray | None = None
    base: np.ndarray | None = None
    queries: np.ndarray | None = None
    gt: np.ndarray | None = None
    report: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)  # base / query / groundtruth in the store
    model_uri: str | None = None
    index_uri: str | None = None
    results_uri: str | None = None


Stage = tuple[str, Callable[[DemoState], None]]


def stage_dataset(s: DemoState) -> None:
    """Resolve dwsift, or write a synthetic clustered dataset into ``out`` when it is absent."""
    c = s.config
    try:
        s.dataset = resolve_dataset("dwsift", s.data_dir)
    except PipelineError as e:
        print(f"  dwsift not available ({e}); generating a synthetic dataset")
        s.dataset = make_synthetic(storage.join(s.out, "synthetic"), n_learn=c.n_learn,
                                   n_base=c.n_base, n_query=c.n_query, k=c.k, seed=c.seed)
    ds = s.dataset
    s.learn = vectors.read_vectors(ds.learn, max_rows=c.n_learn)
    s.base = vectors.read_vectors(ds.base, max_rows=c.n_base)
    s.queries = vectors.read_vectors(ds.query, max_rows=c.n_query)
    s.report["dataset"] = {**ds.to_dict(), "n_learn": len(s.learn), "n_base": len(s.base),
                           "n_query": len(s.queries), "dim": int(s.base.shape[1])}
    print(f"  {ds.name}: learn {s.learn.shape}, base {s.base.shape}, queries {s.queries.shape}")


def stage_ground_truth(s: DemoState) -> None:
    """Check the shipped ground truth on a few queries, then compute it for the subsampled base."""
    c = s.config
    ds = s.dataset
    n_check = min(c.n_check, len(s.queries))
    shipped = vectors.read_vectors(ds.groundtruth, max_rows=n_check)
    _, recomputed = knn_ground_truth(s.queries[:n_check], vectors.iter_blocks(ds.base, 1_000_000), k=min(10, shipped.shape[1]))
    cols = recomputed.shape[1]
    agree = float((recomputed == shipped[:, :cols]).all(axis=1).mean())
    s.report["ground_truth_check"] = {"queries": n_check, "columns": cols, "rows_identical": agree}
    print(f"  shipped ground truth re-derived for {n_check} queries: {agree:.1%} rows identical")
    if agree < 1.0:
        log.warning("%s: shipped ground truth differs from the exact search on %.1f%% of the "
                    "checked queries", ds.groundtruth, 100 * (1 - agree))
    full_base = len(s.base) == vectors.info(ds.base).count
    if full_base:
        s.gt = vectors.read_vectors(ds.groundtruth, max_rows=len(s.queries))
    else:
        _, s.gt = knn_ground_truth(s.queries, s.base, k=min(c.k, len(s.base)))


def stage_baselines(s: DemoState) -> None:
    """Faiss PQ/RQ baselines on the demo data."""
    c = s.config
    rows = run_baselines(s.learn, s.base, s.queries, s.gt, code_bytes=(c.code_bytes,),
                         methods=c.methods, k=c.k, seed=c.seed)
    s.report["baselines"] = rows
    print(format_table(rows))


def stage_train(s: DemoState) -> None:
    """Train an IVF-QINCo2 model (``cpu`` preset, 8-byte codes) in this process, time-boxed."""
    c = s.config
    x = np.asarray(s.learn, dtype=np.float32)
    n_val = min(c.n_val, len(x) // 5)
    qcfg = config_from_preset("cpu", x.shape[1], M=c.code_bytes, K=256, nlist=c.nlist)
    tcfg = TrainConfig(epochs=c.train_epochs, time_budget_s=c.train_time_s, seed=c.seed, val_size=n_val,
                       rq_iters=c.rq_iters, lr=default_lr("cpu"), lr_schedule="time", warmup_steps=20,
                       batch_size=256 if len(x) < 5_000 else 1024)
    model, history = train_model(x[n_val:], x[:n_val], qcfg, tcfg,
                                 on_epoch_end=lambda rec, _t: print(
                                     f"  epoch {rec['epoch']}: val MSE {rec['val_mse']:.5g}", flush=True))
    s.model_uri = storage.join(s.out, "model")
    save_model(model, s.model_uri, metadata={"train_config": tcfg.to_dict(), "preset": "cpu", "history": history})
    best = min(h["val_mse"] for h in history)
    s.report["train"] = {"qinco": qcfg.to_dict(), "epochs": len(history) - 1, "val_mse_rq_init": history[0]["val_mse"],
                         "val_mse_best": best, "model_uri": s.model_uri}
    print(f"  {len(history) - 1} epochs; val MSE {history[0]['val_mse']:.5g} (RQ init) -> {best:.5g}")


def _store_inputs(s: DemoState) -> None:
    """Put the demo's base, queries and ground truth into the object store (a local folder)."""
    data = storage.join(s.out, "store")
    ext = "bvecs" if s.base.dtype == np.uint8 else "fvecs"
    s.files = {"base": storage.join(data, f"base.{ext}"), "query": storage.join(data, "query.fvecs"),
               "groundtruth": storage.join(data, "groundtruth.ivecs")}
    vectors.write_vectors(s.files["base"], s.base)
    vectors.write_vectors(s.files["query"], np.asarray(s.queries, dtype=np.float32))
    vectors.write_vectors(s.files["groundtruth"], np.asarray(s.gt, dtype=np.int32))


def stage_encode(s: DemoState) -> None:
    """Encode the base into IVF shards with the Ray encode job (byte-range reads, actor pool)."""
    c = s.config
    _store_inputs(s)
    s.index_uri = storage.join(s.out, "index")
    rep = run_encode(EncodeJobConfig(model_uri=s.model_uri, data_uris=[s.files["base"]], index_uri=s.index_uri,
                                     workers=c.workers, cpus_per_worker=0.5, shard_rows=c.shard_rows,
                                     overwrite=True), progress=True)
    garbage_collect(s.index_uri, keep=2)  # re-runs into the same folder keep the last two versions
    s.report["encode"] = {k: rep.get(k) for k in ("status", "version", "vectors", "shards", "vectors_per_s",
                                                  "bytes_out", "wall_s")}
    vps = rep.get("vectors_per_s")
    print(f"  {rep['status']} {rep['version']}: {rep.get('vectors')} vectors in {rep.get('shards')} shards"
          + (f", {vps:,.0f} vectors/s" if vps else ""))


def stage_search(s: DemoState) -> None:
    """Answer the queries with the Ray search job (shard actors, LUT shortlist, QINCo re-rank)."""
    c = s.config
    s.results_uri = storage.join(s.out, "results", "qinco.bin")
    k = min(c.k, len(s.base))
    params = SearchParams(k=k, nprobe=min(c.nprobe, c.nlist), shortlist=max(c.shortlist, k))
    rep = run_search(SearchJobConfig(index_uri=s.index_uri, queries_uri=s.files["query"], out_uri=s.results_uri,
                                     params=params, workers=c.workers, cpus_per_worker=0.5))
    s.report["search"] = {k_: rep[k_] for k_ in ("version", "queries", "queries_per_s", "search_s")}
    print(f"  {rep['queries']} queries against {rep['version']}: {rep['queries_per_s']:,.0f} queries/s")


def stage_evaluate(s: DemoState) -> None:
    """Recall of the QINCo index against exact ground truth, next to the Faiss baselines."""
    c = s.config
    recall = evaluate_results(s.results_uri, s.files["groundtruth"])  # also recorded in the index history
    row = {"method": "QINCo2", "factory": f"IVF{c.nlist},QINCo2-cpu,{c.code_bytes}x8", "bytes": c.code_bytes,
           **{k: v for k, v in recall.items() if k.startswith("R@")}}
    s.report["recall"] = {"qinco": recall, "nprobe": min(c.nprobe, c.nlist), "shortlist": c.shortlist}
    rows = [row] + [r for r in s.report.get("baselines", []) if r.get("bytes") == c.code_bytes]
    print(format_table(rows, columns=["method", "factory", "bytes", *[k for k in ("R@1", "R@10", "R@100")
                                                                     if k in recall]]))
    print("  QINCo2 searches its IVF index (nprobe lists) and re-ranks a shortlist; the baselines scan "
          "every code.")


def stage_history(s: DemoState) -> None:
    """``qinco report`` for the demo index: versions, model, sizes, recall."""
    print(format_report(index_report(s.index_uri)))


def demo_stages() -> list[Stage]:
    """The stages of the demo, in order."""
    return [
        ("dataset", stage_dataset),
        ("ground_truth", stage_ground_truth),
        ("baselines", stage_baselines),
        ("train", stage_train),
        ("encode", stage_encode),
        ("search", stage_search),
        ("evaluate", stage_evaluate),
        ("history", stage_history),
    ]


def run_demo(data_dir: str | None = None, out: str = "demo-out", quick: bool = False) -> dict:
    """Run every demo stage, print a timing per stage, write ``<out>/demo_report.json``."""
    config = DemoConfig.for_mode(quick)
    state = DemoState(config=config, out=str(out), data_dir=data_dir)
    timings: list[dict] = []
    t_all = time.perf_counter()
    started_ray = ensure_ray()
    try:
        for name, fn in demo_stages():
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            fn(state)
            dt = time.perf_counter() - t0
            timings.append({"stage": name, "seconds": dt})
            print(f"[{name}] done in {dt:.1f} s", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    total = time.perf_counter() - t_all
    report = {**state.report, "config": config.to_dict(), "quick": quick,
              "stages": timings, "total_seconds": total,
              "code_version": code_version(), "machine": machine_info()}
    uri = storage.join(state.out, "demo_report.json")
    storage.write_bytes_atomic(uri, json.dumps(report, indent=2, sort_keys=True).encode())
    print(f"demo finished in {total:.1f} s; report: {uri}")
    return report
