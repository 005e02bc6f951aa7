"""Inner product and cosine indexes: with every list probed and every code re-ranked, a search
returns exactly the brute-force neighbours by that metric among the decoded vectors, through the
in-process searcher and the query job; scores are inner products (cosine similarities), best
first; cosine normalises training, database and query vectors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import clustered_vectors
from pipeline.api import open_index
from pipeline.codec.decoder import Decoder
from pipeline.codec.encoder import encode
from pipeline.codec.metric import prepare, scores
from pipeline.codec.model import QincoConfig
from pipeline.codec.model_file import save_model
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.io import results, vectors
from pipeline.search.evaluation import recall_at, search_decoded
from pipeline.search.params import SearchParams
from pipeline.search.rerank import brute_force_reference
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.search import SearchJobConfig, run_search
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_model

pytestmark = pytest.mark.ray

N, D, NLIST = 3000, 16, 8
ALL = {"nprobe": NLIST, "shortlist": N}  # every list, every code re-ranked: the exact order


def _norms_vary(x, seed):
    """Rows of very different norms: inner-product and L2 neighbours then differ."""
    return (x * np.random.default_rng(seed).uniform(0.3, 3.0, (len(x), 1))).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("metric")
    x = _norms_vary(clustered_vectors(N, D, seed=31), 1)
    learn = _norms_vary(clustered_vectors(2500, D, seed=32), 2)
    q = _norms_vary(clustered_vectors(40, D, seed=33), 3)
    vectors.write_vectors(str(d / "base.fvecs"), x)
    vectors.write_vectors(str(d / "query.fvecs"), q)
    return {"dir": d, "x": x, "learn": learn, "q": q, "base": str(d / "base.fvecs"), "query": str(d / "query.fvecs")}


def _index(data, metric):
    d = data["dir"]
    qcfg = QincoConfig(dim=D, M=8, K=64, L=1, de=16, dh=32, A=8, B=4, nlist=NLIST, metric=metric)
    model, _ = train_model(data["learn"][200:], data["learn"][:200], qcfg, TrainConfig(epochs=0, val_size=200, rq_iters=4))
    save_model(model, str(d / f"model-{metric}"))
    uri = str(d / f"index-{metric}")
    run_encode(EncodeJobConfig(model_uri=str(d / f"model-{metric}"), data_uris=[data["base"]], index_uri=uri,
                               workers=1, cpus_per_worker=0.5, shard_rows=1000), progress=False)
    return model, uri


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exhaustive_search_is_brute_force_by_the_metric(ray_session, data, metric, tmp_path):
    model, uri = _index(data, metric)
    index = open_index(uri)
    assert index.info()["metric"] == metric
    S, I = index.search(data["q"], k=10, **ALL)
    # brute force over the decoded base (the vectors as the index encodes them)
    codes, lists = encode(model, data["x"])
    x_hat = Decoder(model)(codes, lists)
    q = prepare(data["q"], metric)
    D_ref, I_ref = brute_force_reference(q, x_hat, np.arange(N), 10, metric=metric)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(S, scores(D_ref, metric), rtol=1e-6)
    np.testing.assert_allclose(S[:, 0], np.einsum("qd,qd->q", q.astype(np.float64), x_hat[I[:, 0]]), rtol=1e-5)
    assert (S[:, :-1] >= S[:, 1:]).all(), "scores are best (largest) first"
    # the query job (driver probe, actors, exact merge) returns the same
    out = str(tmp_path / "r.bin")
    run_search(SearchJobConfig(index_uri=uri, queries_uri=data["query"], out_uri=out,
                               params=SearchParams(k=10, **ALL), workers=2, cpus_per_worker=0.5))
    I_job, S_job = results.read_knn_results(out)
    np.testing.assert_array_equal(I_job, I)
    np.testing.assert_allclose(S_job, S, rtol=1e-6)
    # against the true neighbours by the metric, the index finds most of them; by L2 it would not
    _, gt = search_decoded(data["q"], data["x"], 10, metric=metric)
    _, gt_l2 = search_decoded(data["q"], data["x"], 10)
    found = recall_at(I, gt, ks=(10,))["R@10"]
    if metric == "ip":  # the norms decide most inner-product neighbours: an L2 ranking misses them
        assert found >= 0.4 and found > recall_at(gt_l2, gt, ks=(10,))["R@10"] + 0.2
    else:  # 16-d unit vectors in 6 bytes: coarse, but far from chance (0.3 %)
        assert found >= 0.2
    # a lookup-table-only search ranks by the same metric
    S0, I0 = index.search(data["q"], k=10, nprobe=NLIST, shortlist=100, rerank=0)
    assert (S0[:, :-1] >= S0[:, 1:]).all() and recall_at(I0, gt, ks=(10,))["R@10"] >= found - 0.2


def test_inner_product_refuses_probe_ratio_and_cosine_refuses_zero_vectors(ray_session, data, tmp_path):
    model, uri = _index(data, "cosine")
    index = open_index(uri)
    with pytest.raises(ConfigError, match="probe_ratio"):
        index.search(data["q"], k=5, probe_ratio=2.0)
    with pytest.raises(VectorFormatError, match="row 3: a zero vector"):
        encode(model, np.concatenate([data["x"][:3], np.zeros((1, D), np.float32)]))
    with pytest.raises(VectorFormatError, match="zero vector"):
        index.search(np.zeros((1, D), np.float32), k=5)
    # cosine: a vector and any positive multiple of it are the same to the index
    S1, I1 = index.search(data["q"][:5], k=10, **ALL)
    S2, I2 = index.search(data["q"][:5] * 7.5, k=10, **ALL)
    np.testing.assert_array_equal(I1, I2)
    assert (S1 <= 1.0 + 1e-3).all()


def test_unknown_metric_is_refused():
    with pytest.raises(ConfigError, match="metric must be one of"):
        QincoConfig(dim=4, metric="hamming")
