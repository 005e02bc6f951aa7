"""The end-to-end demo job behind ``qinco demo``.

It runs a list of named stages over one shared state and prints how long each took. The data
is the real ``dwsift`` set when it is available (subsampled so the demo stays short), otherwise a
small synthetic clustered set written into the output folder. Later pipeline steps (training,
encoding, search) join the demo by appending a stage to ``demo_stages``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import numpy as np

from pipeline.config import JsonConfig, code_version
from pipeline.errors import PipelineError

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

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoConfig":
        if quick:
            return cls(n_learn=1_000, n_base=2_000, n_query=100, n_check=10)
        return cls()


@dataclasses.dataclass
class DemoState:
    """What the stages read and write."""

    config: DemoConfig
    out: str
    data_dir: str | None
    dataset: Any = None                       # pipeline.datasets.Dataset
    learn: np.ndarray | None = None
    base: np.ndarray | None = None
    queries: np.ndarray | None = None
    gt: np.ndarray | None = None
    report: dict = dataclasses.field(default_factory=dict)


Stage = tuple[str, Callable[[DemoState], None]]


def stage_dataset(s: DemoState) -> None:
    """Resolve dwsift, or write a synthetic clustered dataset into ``out`` when it is absent."""
    from pipeline import storage, vecs_io
    from pipeline.datasets import make_synthetic, resolve_dataset

    c = s.config
    try:
        s.dataset = resolve_dataset("dwsift", s.data_dir)
    except PipelineError as e:
        print(f"  dwsift not available ({e}); generating a synthetic dataset")
        s.dataset = make_synthetic(storage.join(s.out, "synthetic"), n_learn=c.n_learn,
                                   n_base=c.n_base, n_query=c.n_query, k=c.k, seed=c.seed)
    ds = s.dataset
    s.learn = vecs_io.read_vectors(ds.learn, max_rows=c.n_learn)
    s.base = vecs_io.read_vectors(ds.base, max_rows=c.n_base)
    s.queries = vecs_io.read_vectors(ds.query, max_rows=c.n_query)
    s.report["dataset"] = {**ds.to_dict(), "n_learn": len(s.learn), "n_base": len(s.base),
                           "n_query": len(s.queries), "dim": int(s.base.shape[1])}
    print(f"  {ds.name}: learn {s.learn.shape}, base {s.base.shape}, queries {s.queries.shape}")


def stage_ground_truth(s: DemoState) -> None:
    """Check the shipped ground truth on a few queries, then compute it for the subsampled base."""
    from pipeline import vecs_io
    from pipeline.evaluation import knn_ground_truth

    c = s.config
    ds = s.dataset
    n_check = min(c.n_check, len(s.queries))
    shipped = vecs_io.read_vectors(ds.groundtruth, max_rows=n_check)
    _, recomputed = knn_ground_truth(s.queries[:n_check], ds.base, k=min(10, shipped.shape[1]))
    cols = recomputed.shape[1]
    agree = float((recomputed == shipped[:, :cols]).all(axis=1).mean())
    s.report["ground_truth_check"] = {"queries": n_check, "columns": cols, "rows_identical": agree}
    print(f"  shipped ground truth re-derived for {n_check} queries: {agree:.1%} rows identical")
    if agree < 1.0:
        log.warning("%s: shipped ground truth differs from the exact search on %.1f%% of the "
                    "checked queries", ds.groundtruth, 100 * (1 - agree))
    full_base = len(s.base) == vecs_io.info(ds.base).count
    if full_base:
        s.gt = vecs_io.read_vectors(ds.groundtruth, max_rows=len(s.queries))
    else:
        _, s.gt = knn_ground_truth(s.queries, s.base, k=min(c.k, len(s.base)))


def stage_baselines(s: DemoState) -> None:
    """Faiss PQ/RQ baselines on the demo data."""
    from pipeline.baselines import format_table, run_baselines

    c = s.config
    rows = run_baselines(s.learn, s.base, s.queries, s.gt, code_bytes=(c.code_bytes,),
                         methods=c.methods, k=c.k, seed=c.seed)
    s.report["baselines"] = rows
    print(format_table(rows))


def demo_stages() -> list[Stage]:
    """The stages of the demo, in order."""
    return [
        ("dataset", stage_dataset),
        ("ground_truth", stage_ground_truth),
        ("baselines", stage_baselines),
    ]


def run_demo(data_dir: str | None = None, out: str = "demo-out", quick: bool = False) -> dict:
    """Run every demo stage, print a timing per stage, write ``<out>/demo_report.json``."""
    from pipeline import storage
    from pipeline.baselines import machine_info

    config = DemoConfig.for_mode(quick)
    state = DemoState(config=config, out=str(out), data_dir=data_dir)
    timings = {}
    t_all = time.perf_counter()
    for name, fn in demo_stages():
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        fn(state)
        timings[name] = time.perf_counter() - t0
        print(f"[{name}] done in {timings[name]:.1f} s", flush=True)
    total = time.perf_counter() - t_all
    report = {**state.report, "config": config.to_dict(), "quick": quick,
              "stage_seconds": timings, "total_seconds": total,
              "code_version": code_version(), "machine": machine_info()}
    uri = storage.join(state.out, "demo_report.json")
    storage.write_bytes_atomic(uri, json.dumps(report, indent=2, sort_keys=True).encode())
    print(f"demo finished in {total:.1f} s; report: {uri}")
    return report
