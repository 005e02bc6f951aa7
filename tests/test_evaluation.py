"""Recall, k-recall, MSE on hand-made cases; exact blocked ground truth against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io import vectors
from pipeline.errors import ConfigError
from pipeline.search.evaluation import k_recall_at_k, knn_ground_truth, recall_at, search_decoded
from pipeline.codec.decoder import reconstruction_mse


def brute_force(xq, xb, k, metric="L2"):
    """Reference: full sort of every row by (distance, id) in float64."""
    xq = xq.astype(np.float64)
    xb = xb.astype(np.float64)
    if metric == "L2":
        key = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
    else:
        key = -(xq @ xb.T)
    ids = np.arange(xb.shape[0])
    I = np.array([np.lexsort((ids, row))[:k] for row in key])
    D = np.take_along_axis(key, I, axis=1)
    return (D if metric == "L2" else -D), I


def test_recall_at_hand_made():
    I = np.array([[5, 1, 2], [3, 4, 9], [7, 8, 6]])
    gt = np.array([[1, 5], [9, 3], [0, 7]])
    r = recall_at(I, gt, ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": pytest.approx(1 / 3), "R@3": pytest.approx(2 / 3)}
    assert recall_at(gt, gt, ks=(1,)) == {"R@1": 1.0}


def test_recall_at_rejects_bad_shapes():
    with pytest.raises(ConfigError):
        recall_at(np.zeros((3, 5), int), np.zeros((3, 5), int), ks=(10,))
    with pytest.raises(ConfigError):
        recall_at(np.zeros((3, 5), int), np.zeros((4, 5), int), ks=(1,))


def test_k_recall_at_k_hand_made():
    I = np.array([[1, 2, 3, 4], [9, 9, 9, 9], [4, 3, 2, 1]])
    gt = np.array([[1, 5, 3, 8], [9, 1, 2, 3], [1, 2, 3, 4]])
    # k=3 -> row 0: {1,3} of gt {1,5,3}; row 1: 9 counted once; row 2: {2,3} of gt {1,2,3}
    assert k_recall_at_k(I, gt, 3) == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert k_recall_at_k(I, gt, 4) == pytest.approx((2 / 4 + 1 / 4 + 4 / 4) / 3)
    assert k_recall_at_k(I, gt, 1) == pytest.approx(2 / 3)


def test_reconstruction_mse_known_value_and_blocking():
    x = np.zeros((5, 3), dtype=np.uint8)
    xhat = np.array([[3, 4, 0]] * 4 + [[0, 0, 255]], dtype=np.float32)
    expected = (4 * 25 + 255 ** 2) / 5
    assert reconstruction_mse(x, xhat) == pytest.approx(expected)
    assert reconstruction_mse(x, xhat, block_rows=2) == pytest.approx(expected)
    with pytest.raises(ConfigError):
        reconstruction_mse(x, xhat[:4])


@pytest.mark.parametrize("block_rows", [1, 37, 10_000])
def test_knn_ground_truth_blocked_file_equals_brute_force_with_ties(tmp_path, block_rows):
    rng = np.random.default_rng(0)
    # Small integer coordinates: many exactly equal distances, so the id tie-break matters.
    xb = rng.integers(0, 3, size=(500, 4)).astype(np.float32)
    xq = rng.integers(0, 3, size=(30, 4)).astype(np.float32)
    uri = str(tmp_path / "base.fvecs")
    vectors.write_vectors(uri, xb)
    D, I = knn_ground_truth(xq, vectors.iter_blocks(uri, block_rows), k=25, block_rows=block_rows)
    D_ref, I_ref = brute_force(xq, xb, 25)
    assert I.dtype == np.int64 and D.dtype == np.float32
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref)


def test_knn_ground_truth_inner_product_and_padding():
    rng = np.random.default_rng(1)
    xb = rng.integers(-2, 3, size=(200, 5)).astype(np.float32)
    xq = rng.integers(-2, 3, size=(10, 5)).astype(np.float32)
    D, I = knn_ground_truth(xq, xb, k=15, block_rows=16, metric="IP")
    D_ref, I_ref = brute_force(xq, xb, 15, metric="IP")
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref)
    D, I = knn_ground_truth(xq, xb[:3], k=5)
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()
    np.testing.assert_array_equal(np.sort(I[:, :3], axis=1), np.tile([0, 1, 2], (10, 1)))


def test_search_decoded_matches_brute_force():
    rng = np.random.default_rng(2)
    xb = rng.normal(size=(300, 8)).astype(np.float32)
    xq = rng.normal(size=(20, 8)).astype(np.float32)
    D, I = search_decoded(xq, xb, 10)
    D_ref, I_ref = brute_force(xq, xb, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.data
def test_dwsift_ground_truth_reproduced(dwsift_dir):
    xq = vectors.read_vectors(str(dwsift_dir / "query.bvecs"), max_rows=200)
    gt = vectors.read_vectors(str(dwsift_dir / "groundtruth.ivecs"), max_rows=200)
    _, I = knn_ground_truth(xq, vectors.iter_blocks(str(dwsift_dir / "base.bvecs"), 100_000), k=10)
    np.testing.assert_array_equal(I, gt[:, :10])
