"""The Python API (pipeline.api): open_index gives the query job's results, build_index goes from an
array to a searchable index and resumes, encode/decode round-trip arrays."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import clustered_vectors
from pipeline.api import build_index, decode, encode, open_index
from pipeline.codec.model_file import load_model
from pipeline.errors import ConfigError
from pipeline.index.manifest import list_versions
from pipeline.io import results
from pipeline.search.params import SearchParams
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.stages.search import SearchJobConfig, run_search

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def three_shards(ray_session, tiny_index_inputs, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("api") / "index")
    run_encode(EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[tiny_index_inputs["base"]],
                               index_uri=uri, workers=2, cpus_per_worker=0.5, shard_rows=1400), progress=False)
    return uri


def test_open_index_returns_the_query_jobs_results(three_shards, tiny_index_inputs, tmp_path):
    kw = {"nprobe": 3, "shortlist": 40, "rerank": 20}
    out = str(tmp_path / "r.bin")
    run_search(SearchJobConfig(index_uri=three_shards, queries_uri=tiny_index_inputs["query"], out_uri=out,
                               params=SearchParams(k=10, **kw), workers=2, cpus_per_worker=0.5))
    I_job, D_job = results.read_knn_results(out)
    index = open_index(three_shards)
    D, I = index.search(tiny_index_inputs["q"], k=10, **kw)
    assert D.dtype == np.float32 and I.dtype == np.int64 and I.shape == (50, 10)
    np.testing.assert_array_equal(I, I_job)
    np.testing.assert_allclose(D, D_job, rtol=1e-6)
    # one query as a 1-d row, float64: the same answer as in the batch
    D1, I1 = index.search(tiny_index_inputs["q"][7].astype(np.float64), k=10, **kw)
    np.testing.assert_array_equal(I1[0], I[7])
    info = index.info()
    assert (info["ntotal"], info["d"], info["shards"], info["version"]) == (4000, 16, 3, "v000001")
    assert info["code"]["M"] == 4


def test_search_refuses_unknown_parameters_and_bad_queries(three_shards):
    index = open_index(three_shards)
    with pytest.raises(ConfigError, match="unknown search parameter.*nprobes"):
        index.search(np.zeros((1, 16), np.float32), k=5, nprobes=3)
    with pytest.raises(ConfigError, match=r"shape \(Q, 16\)"):
        index.search(np.zeros((2, 15), np.float32), k=5)
    with pytest.raises(ConfigError, match="shortlist"):
        index.search(np.zeros((2, 16), np.float32), k=50, shortlist=10)


def test_encode_decode_round_trip(tiny_index_inputs):
    x = tiny_index_inputs["x"][:500]
    codes, lists = encode(tiny_index_inputs["model"], x)
    assert codes.shape == (500, 4) and codes.dtype == np.uint8 and lists.shape == (500,)
    model = load_model(tiny_index_inputs["model"])
    xr = decode(model, codes, lists)
    assert xr.shape == x.shape and xr.dtype == np.float32
    err = ((xr - x) ** 2).sum(1).mean()
    # each row's own codes reconstruct it far better than its neighbour row's codes do
    other = decode(model, np.roll(codes, 1, axis=0), np.roll(lists, 1))
    assert err < 0.5 * ((other - x) ** 2).sum(1).mean()
    # a prefix of the codes decodes to a worse reconstruction than all of them
    assert ((decode(model, codes, lists, prefix=1) - x) ** 2).sum(1).mean() > err
    with pytest.raises(ConfigError, match="list ids"):
        decode(model, codes)
    with pytest.raises(ConfigError, match=r"shape \(N, 4\)"):
        decode(model, codes[:, :3], lists)


def test_build_index_from_an_array_then_resume(ray_session, tmp_path):
    x = clustered_vectors(5000, 16, seed=11)
    uri = str(tmp_path / "built")
    index = build_index(x, uri, code_bytes=4, train_epochs=0, shard_rows=2000, echo=lambda m: None)
    assert index.ntotal == 5000 and index.d == 16
    assert index.info()["code"]["nlist"] == 0  # --ivf auto: flat below 100k vectors
    # each base vector finds itself among its nearest (ids are row numbers of the array)
    D, I = index.search(x[:200], k=10, nprobe=1, shortlist=50)
    assert np.mean([i in row for i, row in enumerate(I)]) > 0.9
    # the exact distances of the re-ranked results are those of decoded vectors: never below 0
    assert (D >= 0).all()
    # the same call again: the model is reused and the committed version is kept
    msgs = []
    again = build_index(x, uri, code_bytes=4, train_epochs=0, shard_rows=2000, echo=msgs.append)
    assert any("using the model" in m for m in msgs)
    assert list_versions(uri) == ["v000001"] and again.version == "v000001"
    np.testing.assert_array_equal(again.search(x[:200], k=10, nprobe=1, shortlist=50)[1], I)


def test_build_index_refuses_bad_data(tmp_path):
    with pytest.raises(ConfigError, match="2-d numeric"):
        build_index(np.zeros(10, np.float32), str(tmp_path / "i"))
    with pytest.raises(ConfigError, match="list of URIs"):
        build_index([], str(tmp_path / "i"))
