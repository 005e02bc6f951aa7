"""Choosing the search settings for a recall target: the fastest measured setting that reaches it.

``tune`` runs a sample of queries with known ground truth through a search function (the query
job's, so the speeds are the job's) over a ladder of settings and returns the fastest one whose
recall reaches the target, with every point it measured. The settings are ``nprobe`` and the
re-rank ``R`` with ``shortlist = max(R, k)``: with ``R`` below the shortlist, the results are the
lookup tables' best ``R`` re-ranked and then the lookup-table order, which a longer shortlist does
not change, so a longer one would only cost time.

The ladders are walked from the cheap end: for each ``nprobe`` (1, 2, 4, ...) the re-rank grows
until the target is reached; an ``nprobe`` whose cheapest point (no re-rank) is already slower
than the best setting found ends the walk, as every later one is slower still.

Measures: ``R@k`` (the true nearest neighbour among the first k results, the QINCo papers'
recall) and ``k-recall@k`` (the share of the true k nearest among the first k), from
:mod:`pipeline.search.evaluation`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable

import numpy as np

from pipeline.errors import ConfigError
from pipeline.search.evaluation import k_recall_at_k, recall_at
from pipeline.search.params import SearchParams

log = logging.getLogger(__name__)

NPROBE_LADDER = tuple(2 ** i for i in range(13))
RERANK_LADDER = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

SearchFn = Callable[[SearchParams], np.ndarray]


def check_measure(measure: str, k: int) -> None:
    """ConfigError unless ``measure`` is ``R@j`` or ``j-recall@j`` with ``j <= k``."""
    m = re.fullmatch(r"R@(\d+)|(\d+)-recall@(\d+)", measure)
    if not m or (m.group(2) and m.group(2) != m.group(3)):
        raise ConfigError(f"recall measure must be R@j or j-recall@j (e.g. R@10, 10-recall@10), got {measure!r}")
    j = int(m.group(1) or m.group(2))
    if not 1 <= j <= k:
        raise ConfigError(f"recall measure {measure} needs {j} results per query; the search returns k={k}")


def recall_of(I_QK: np.ndarray, gt_QG: np.ndarray, measure: str) -> float:
    """The recall ``measure`` (see ``check_measure``) of results ``I_QK`` against ``gt_QG``."""
    check_measure(measure, I_QK.shape[1])
    if measure.startswith("R@"):
        j = int(measure[2:])
        return recall_at(I_QK, gt_QG, ks=(j,))[measure]
    return k_recall_at_k(I_QK, gt_QG, int(measure.split("-")[0]))


def tune(search: SearchFn, n_queries: int, gt_QG: np.ndarray, target: float, k: int, nlist: int,
         measure: str = "R@10", max_rerank: int = RERANK_LADDER[-1]) -> dict:
    """The fastest setting whose ``measure`` on the sample reaches ``target`` (see the module
    docstring). ``search(params)`` returns the ids ``(n_queries, k)`` of the sample's results.

    Returns ``{"chosen": SearchParams dict, "recall", "queries_per_s", "points": [...], ...}``;
    ConfigError when no setting reaches the target, naming the best recall measured.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"the target recall must be in (0, 1], got {target}")
    check_measure(measure, k)
    points: list[dict] = []
    best: dict | None = None
    search(SearchParams(k=k, nprobe=1, shortlist=max(k, 1), rerank=min(1, k)))  # warm-up (decoders, caches)
    for nprobe in (p for p in NPROBE_LADDER if p <= max(nlist, 1)):
        first = None
        for R in (r for r in RERANK_LADDER if r <= max_rerank):
            params = SearchParams(k=k, nprobe=nprobe, shortlist=max(R, k), rerank=R).validate()
            t = time.perf_counter()
            I = search(params)
            qps = n_queries / max(time.perf_counter() - t, 1e-9)
            point = {"nprobe": nprobe, "shortlist": params.shortlist, "rerank": R,
                     "recall": recall_of(I, gt_QG, measure), "queries_per_s": qps}
            points.append(point)
            first = first or point
            log.info("nprobe %d, rerank %d: %s %.4f at %.0f queries/s", nprobe, R, measure, point["recall"], qps)
            if point["recall"] >= target:
                if best is None or qps > best["queries_per_s"]:
                    best = point
                break  # a longer re-rank at this nprobe is slower
            if best is not None and qps < best["queries_per_s"]:
                break  # so is every longer re-rank at this nprobe
        if best is not None and first is not best and first["queries_per_s"] < best["queries_per_s"]:
            break  # this nprobe's cheapest point is slower than the best: so is every later nprobe
    if best is None:
        top = max(points, key=lambda p: p["recall"])
        raise ConfigError(f"no setting reaches {measure} {target} on the {n_queries} tuning queries: the best "
                          f"measured is {top['recall']:.4f} (nprobe {top['nprobe']}, rerank {top['rerank']}); "
                          f"lower the target")
    chosen = SearchParams(k=k, nprobe=best["nprobe"], shortlist=best["shortlist"], rerank=best["rerank"])
    return {"target": target, "measure": measure, "queries": n_queries, "chosen": chosen.to_dict(),
            "recall": best["recall"], "queries_per_s": best["queries_per_s"], "points": points}
