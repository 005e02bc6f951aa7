"""Faiss baselines: factory strings, properties on a tiny set, and the dwsift reference figures."""

from __future__ import annotations

import pytest

from pipeline.io import vectors
from pipeline.stages.baselines import factory_string, format_table, make_quantizer, run_baselines
from pipeline.stages.datasets import clustered_vectors
from pipeline.errors import ConfigError
from pipeline.search.evaluation import knn_ground_truth


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def tiny():
    xt = clustered_vectors(2000, 12, seed=5, stream=0)
    xb = clustered_vectors(1500, 12, seed=5, stream=1)
    xq = clustered_vectors(60, 12, seed=5, stream=2)
    _, gt = knn_ground_truth(xq, xb, k=100)
    return xt, xb, xq, gt


def test_factory_strings():
    assert factory_string("PQ", 8) == "PQ8x8"
    assert factory_string("OPQ", 16, 128) == "OPQ16,PQ16x8"
    assert factory_string("RQ", 8) == "RQ8x8"
    assert factory_string("LSQ", 16) == "LSQ16x8"
    assert factory_string("PQ", 8, 50) == "Pad56,PQ8x8"
    assert factory_string("OPQ", 16, 50) == "OPQ16_64,PQ16x8"
    with pytest.raises(ConfigError):
        factory_string("SQ", 8)


def test_rq_uses_beam_5():
    assert make_quantizer("RQ", 4, 16).rq.max_beam_size == 5


def test_run_baselines_properties(tiny):
    xt, xb, xq, gt = tiny
    rows = run_baselines(xt, xb, xq, gt, code_bytes=(1, 4), methods=("PQ", "RQ"), k=100)
    assert [(r["method"], r["bytes"]) for r in rows] == [("PQ", 1), ("RQ", 1), ("PQ", 4), ("RQ", 4)]
    total_variance = float(((xb - xb.mean(0)) ** 2).sum(1).mean())
    for r in rows:
        assert r["n_learn"] == 2000 and r["n_base"] == 1500 and r["n_query"] == 60
        assert 0 < r["mse"] < total_variance
        assert 0 <= r["R@1"] <= r["R@10"] <= r["R@100"] <= 1
        assert r["encode_vps"] > 0 and r["train_s"] >= 0
    by = {(r["method"], r["bytes"]): r for r in rows}
    for m in ("PQ", "RQ"):
        assert by[m, 4]["mse"] < by[m, 1]["mse"]
        assert by[m, 4]["R@1"] > by[m, 1]["R@1"]
    # one 8-bit PQ codebook over 12 dims has 256 centroids: a 4-byte code must do much better
    assert by["RQ", 4]["R@10"] > 0.5


def test_padded_pq_on_dimension_not_divisible(tiny):
    xt, xb, xq, gt = tiny
    rows = run_baselines(xt[:, :10], xb[:, :10], xq[:, :10],
                         knn_ground_truth(xq[:, :10], xb[:, :10], k=10)[1],
                         code_bytes=(4,), methods=("PQ",), k=10)
    assert rows[0]["factory"] == "Pad12,PQ4x8"
    total_variance = float(((xb[:, :10] - xb[:, :10].mean(0)) ** 2).sum(1).mean())
    assert rows[0]["mse"] < 0.5 * total_variance


def test_run_baselines_rejects_mismatched_ground_truth(tiny):
    xt, xb, xq, gt = tiny
    with pytest.raises(ConfigError, match="ground-truth ids"):
        run_baselines(xt, xb[:100], xq, gt, code_bytes=(2,), methods=("PQ",))
    with pytest.raises(ConfigError):
        run_baselines(xt, xb, xq[:10], gt, code_bytes=(2,), methods=("PQ",))


def test_format_table_aligned():
    rows = [{"method": "PQ", "factory": "PQ8x8", "bytes": 8, "mse": 26224.4, "R@1": 0.2708},
            {"method": "LSQ", "factory": "LSQ16x8", "bytes": 16, "mse": 11118.0, "R@1": 0.5231}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and len({len(x) for x in lines}) == 1
    assert "26,224" in lines[2] and "0.271" in lines[2] and "LSQ16x8" in lines[3]


@pytest.mark.data
@pytest.mark.slow
def test_dwsift_pq8_reproduces_reference(dwsift_dir):
    """Acceptance: PQ8x8 on full learn/base and all 10,000 queries matches the shipped figures."""
    read = lambda name: vectors.read_vectors(str(dwsift_dir / name))  # noqa: E731
    xt, xb, xq, gt = read("learn.bvecs"), read("base.bvecs"), read("query.bvecs"), read("groundtruth.ivecs")
    assert xq.shape[0] == 10_000 and xb.shape[0] == 223_825
    (row,) = run_baselines(xt, xb, xq, gt, code_bytes=(8,), methods=("PQ",), k=100)
    assert row["mse"] == pytest.approx(26_224, rel=0.03)
    assert row["R@1"] == pytest.approx(0.271, abs=0.01)
    assert row["R@10"] == pytest.approx(0.695, abs=0.015)


def test_baselines_follow_the_metric(tiny):
    """By inner product the ground truth and the quantizers' search change together: measured
    against the inner-product neighbours, the inner-product search finds far more of them."""
    import numpy as np

    xt, xb, xq, _ = tiny
    scale = np.random.default_rng(0).uniform(0.3, 3.0, (len(xb), 1)).astype(np.float32)
    xb = xb * scale  # norms that differ: inner-product and L2 neighbours then differ
    _, gt_ip = knn_ground_truth(xq, xb, k=10, metric="ip")
    ip = run_baselines(xt, xb, xq, gt_ip, code_bytes=[4], methods=["PQ"], k=10, metric="ip")[0]
    l2 = run_baselines(xt, xb, xq, gt_ip, code_bytes=[4], methods=["PQ"], k=10, metric="l2")[0]
    assert ip["metric"] == "ip" and ip["R@10"] > l2["R@10"] + 0.2
    # cosine: the ground truth of scaled vectors is that of the unscaled ones
    _, gt_cos = knn_ground_truth(xq, xb, k=10, metric="cosine")
    _, gt_cos0 = knn_ground_truth(xq, xb / scale, k=10, metric="cosine")
    assert (gt_cos[:, 0] == gt_cos0[:, 0]).mean() >= 0.95
