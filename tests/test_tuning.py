"""Choosing search settings for a recall target (pipeline.search.tuning)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.search.tuning import check_measure, recall_of, tune

Q, K = 200, 10


def _fake_search(recall_fn, cost_fn, gt):
    """A search whose results hold the true neighbour for the first ``recall_fn(params)`` share of
    the queries and that takes ``cost_fn(params)`` seconds."""
    calls = []

    def search(p):
        calls.append(p)
        time.sleep(cost_fn(p))
        hit = int(round(recall_fn(p) * Q))
        I = np.full((Q, K), -1, np.int64)
        I[:hit, K - 1] = gt[:hit, 0]
        return I
    return search, calls


def test_tune_chooses_the_fastest_setting_that_reaches_the_target():
    gt = np.arange(Q)[:, None] + 1000
    # recall grows with nprobe and with the re-rank; cost grows with both
    recall = lambda p: min(1.0, 0.2 * np.log2(2 * p.nprobe) + (0.25 if p.reranked >= 5 else 0.0))  # noqa: E731
    cost = lambda p: 0.006 * p.nprobe + 0.003 * p.reranked  # noqa: E731
    search, calls = _fake_search(recall, cost, gt)
    out = tune(search, Q, gt, 0.7, K, nlist=64, measure="R@10", max_rerank=100)
    grid = [(n, r) for n in (1, 2, 4, 8, 16, 32, 64) for r in (0, 1, 2, 5, 10, 20, 50, 100)]
    ok = [(cost(type("P", (), {"nprobe": n, "reranked": r})), n, r) for n, r in grid
          if recall(type("P", (), {"nprobe": n, "reranked": r})) >= 0.7]
    _, n_best, r_best = min(ok)
    assert (out["chosen"]["nprobe"], out["chosen"]["rerank"]) == (n_best, r_best) == (4, 5)
    assert out["recall"] >= 0.7 and out["chosen"]["shortlist"] == max(r_best, K)
    assert out["queries_per_s"] == max(p["queries_per_s"] for p in out["points"] if p["recall"] >= 0.7)
    # the walk stops: no nprobe beyond the one whose cheapest point is slower than the choice
    assert max(p.nprobe for p in calls) <= 16


def test_an_unreachable_target_is_refused_with_the_best_recall_measured():
    gt = np.arange(Q)[:, None]
    search, _ = _fake_search(lambda p: 0.5, lambda p: 0.0, gt)
    with pytest.raises(ConfigError, match=r"no setting reaches R@10 0.9 .* best measured is 0.5000"):
        tune(search, Q, gt, 0.9, K, nlist=4)
    with pytest.raises(ConfigError, match="target recall"):
        tune(search, Q, gt, 1.5, K, nlist=4)


def test_recall_measures():
    gt = np.array([[1, 2], [3, 4]])
    I = np.array([[2, 1], [5, 6]])
    assert recall_of(I, gt, "R@1") == 0.0 and recall_of(I, gt, "R@2") == 0.5
    assert recall_of(I, gt, "2-recall@2") == 0.5
    for bad in ("R@0", "recall", "2-recall@3", "R@11"):
        with pytest.raises(ConfigError):
            check_measure(bad, 10)
