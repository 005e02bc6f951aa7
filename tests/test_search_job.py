"""The Ray query job: sharding invariance, exact merge, actor recovery, bad shards, CLI, recall."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

from pipeline.io import results
from pipeline.io import storage, vectors
from pipeline.stages.encode import EncodeJobConfig, run_encode
from pipeline.errors import ConfigError, PipelineError
from pipeline.index.manifest import load_manifest, version_dir
from pipeline.search.params import SearchParams
from pipeline.stages.search import run_search, SearchJobConfig
from pipeline.distributed.shard_pool import ShardActor, ShardPool

pytestmark = pytest.mark.ray


def _encode(inp, index_uri, shard_rows):
    run_encode(EncodeJobConfig(model_uri=inp["model"], data_uris=[inp["base"]], index_uri=index_uri,
                               workers=2, cpus_per_worker=0.5, shard_rows=shard_rows, batch_size=1024),
               progress=False)
    return index_uri


@pytest.fixture(scope="module")
def indexes(ray_session, tiny_index_inputs, tmp_path_factory):
    """The tiny base as one shard and as three shards (same model, same codes)."""
    d = tmp_path_factory.mktemp("search_job")
    return {"one": _encode(tiny_index_inputs, str(d / "one"), 4000),
            "three": _encode(tiny_index_inputs, str(d / "three"), 1400)}


@pytest.fixture(scope="module")
def baseline(indexes, tiny_index_inputs, tmp_path_factory):
    """Query-job results on both indexes (k=10, nprobe=3, shortlist=40), computed once."""
    d = tmp_path_factory.mktemp("search_results")
    return {name: _search(indexes[name], tiny_index_inputs, str(d / name)) + (str(d / name),)
            for name in ("one", "three")}


def _search(index, inp, out, allow_partial=False, **kw):
    """The query job with k=10, nprobe=3, shortlist=40 unless ``kw`` (SearchParams fields) says otherwise."""
    params = SearchParams(**{"k": 10, "nprobe": 3, "shortlist": 40, **kw})
    report = run_search(SearchJobConfig(index_uri=index, queries_uri=inp["query"], out_uri=out, params=params,
                                        workers=2, cpus_per_worker=0.5, allow_partial=allow_partial))
    I, D = results.read_knn_results(out)
    return I, D, report


def _copy_index(index, dst):
    shutil.copytree(index, dst)
    m = load_manifest(dst)
    return m, version_dir(dst, m.version)


def test_three_shards_give_the_same_results_as_one(baseline, tiny_index_inputs):
    I1, D1, r1, _ = baseline["one"]
    I3, D3, r3, out3 = baseline["three"]
    assert r1["shards"] == 1 and r3["shards"] == 3
    assert r3["failed_shards"] == [] and r3["queries"] == len(tiny_index_inputs["q"])
    assert (I3 >= 0).all()
    np.testing.assert_array_equal(I3, I1)
    np.testing.assert_allclose(D3, D1, rtol=1e-5, atol=1e-5)
    assert (np.diff(D3, axis=1) >= 0).all()  # sorted by distance
    # the parquet copy and the report are written beside the results
    assert os.path.exists(out3 + ".parquet")
    saved = json.loads(open(out3 + ".report.json").read())
    assert saved["params"]["params"]["nprobe"] == 3 and saved["code_version"]


def test_prefix_stage_three_shards_give_the_same_results_as_one(indexes, tiny_index_inputs, tmp_path):
    """With the prefix stage on, the job merges the shards' prefix shortlists exactly: three shards
    answer like one, and the results are those of the in-process searcher over all rows."""
    from pipeline.search.params import SearchParams

    kw = dict(prefix_steps=2, prefix_shortlist=20, rerank=0, shortlist=10)
    I1, D1, r1 = _search(indexes["one"], tiny_index_inputs, str(tmp_path / "one"), **kw)
    I3, D3, r3 = _search(indexes["three"], tiny_index_inputs, str(tmp_path / "three"), **kw)
    assert r3["shards"] == 3 and r3["params"]["params"]["prefix_steps"] == 2
    np.testing.assert_array_equal(I3, I1)
    np.testing.assert_array_equal(D3, D1)
    from pipeline.codec.decoder import model_row_scales
    from pipeline.codec.encoder import encode
    from pipeline.search.scan import build_searcher

    inp = tiny_index_inputs
    codes, lists = encode(inp["model_obj"], inp["x"])
    order = np.lexsort((np.arange(len(lists)), lists))
    offsets = np.searchsorted(lists[order], np.arange(inp["model_obj"].config.nlist + 1))
    s = build_searcher(inp["model_obj"], lists[order], order, codes[order], offsets,
                       scale_N=model_row_scales(inp["model_obj"], codes[order], lists[order]))
    D_ref, I_ref = s.search(inp["q"], SearchParams(k=10, nprobe=3, shortlist=10, prefix_steps=2,
                                                    prefix_shortlist=20))
    np.testing.assert_array_equal(I1, I_ref)
    # the prefix stage changed the ranking here: a short S1 drops candidates
    I_full, _, _ = _search(indexes["three"], tiny_index_inputs, str(tmp_path / "full"), rerank=0, shortlist=10)
    assert not np.array_equal(I_full, I3)
    with pytest.raises(ConfigError, match="prefix_steps must be below the model's M = 4"):
        _search(indexes["three"], tiny_index_inputs, str(tmp_path / "bad"), prefix_steps=4)
    with pytest.raises(ConfigError, match="prefix_shortlist"):
        _search(indexes["three"], tiny_index_inputs, str(tmp_path / "bad"), prefix_steps=2, prefix_shortlist=5)


def test_probe_ratio_in_the_job_equals_the_in_process_searcher(indexes, tiny_index_inputs, tmp_path):
    """The driver prunes the probed lists (``probe_ratio``) before fanning out: three shards answer
    like the in-process searcher over all rows with the same parameters, and fewer lists are
    visited than without it."""
    from pipeline.codec.decoder import model_row_scales
    from pipeline.codec.encoder import encode
    from pipeline.search.scan import build_searcher
    from pipeline.search.params import SearchParams
    from pipeline.search.probe import prune_lists

    inp = tiny_index_inputs
    kw = dict(nprobe=4, probe_ratio=1.2, rerank=0, shortlist=10)
    I3, D3, r3 = _search(indexes["three"], inp, str(tmp_path / "three"), **kw)
    assert r3["params"]["params"]["probe_ratio"] == 1.2
    model = inp["model_obj"]
    codes, lists = encode(model, inp["x"])
    order = np.lexsort((np.arange(len(lists)), lists))
    offsets = np.searchsorted(lists[order], np.arange(model.config.nlist + 1))
    s = build_searcher(model, lists[order], order, codes[order], offsets,
                       scale_N=model_row_scales(model, codes[order], lists[order]))
    q = inp["q"]
    D_ref, I_ref = s.search(q, SearchParams(k=10, nprobe=4, shortlist=10, probe_ratio=1.2))
    np.testing.assert_array_equal(I3, I_ref)
    visited = (prune_lists(q, s.probe(q, 4)[1], s.centroids_LD, 1.2) >= 0).sum(1)
    assert visited.mean() < 4
    I_all, _, _ = _search(indexes["three"], inp, str(tmp_path / "all"), nprobe=4, rerank=0, shortlist=10)
    assert not np.array_equal(I_all, I3)
    with pytest.raises(ConfigError, match="probe_ratio"):
        _search(indexes["three"], inp, str(tmp_path / "bad"), probe_ratio=0.9)


def test_merge_is_exact_against_brute_force_over_probed_lists(indexes, tiny_index_inputs):
    """With a shortlist covering every probed code, the result is the exact top-k over the
    QINCo-decoded vectors of the probed lists, whatever the sharding."""
    import faiss

    from pipeline.codec.decoder import decode
    from pipeline.codec.encoder import encode
    from pipeline.search.rerank import sqdist_rows
    from pipeline.search.topk import topk_smallest

    inp = tiny_index_inputs
    model, q = inp["model_obj"], inp["q"]
    nprobe, k = 2, 10
    codes, lists = encode(model, inp["x"])
    xhat = decode(model, codes, lists)
    cent = model.centroids_LD.detach().numpy().astype(np.float32)
    probe = faiss.IndexFlatL2(cent.shape[1])
    probe.add(cent)
    _, lp = probe.search(q, nprobe)
    in_probe = (lists[None, :, None] == lp[:, None, :]).any(-1)  # (Q, N)
    S = int(in_probe.sum(1).max())
    D_ref = np.where(in_probe, sqdist_rows(q, np.broadcast_to(xhat, (len(q),) + xhat.shape)), np.inf)
    I_ref = np.where(in_probe, np.arange(len(xhat))[None, :], -1)
    D_ref, I_ref = topk_smallest(D_ref, I_ref, k)

    pool = ShardPool(indexes["three"], workers=2, cpus_per_worker=0.5)
    try:
        D, I = pool.search_batch(q, SearchParams(k=k, nprobe=nprobe, shortlist=S))
        D_small, I_small = pool.search_batch(q, SearchParams(k=k, nprobe=nprobe, shortlist=k))
        D_bf, I_bf = pool.search_batch(q, SearchParams(k=k, nprobe=nprobe, shortlist=S), precision="bfloat16")
        D_r3, I_r3 = pool.search_batch(q, SearchParams(k=k, nprobe=nprobe, shortlist=S, rerank=3))
        D_lut, I_lut = pool.search_batch(q, SearchParams(k=k, nprobe=nprobe, shortlist=S, rerank=0))
    finally:
        pool.close()
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    # a bfloat16 decoder re-ranks almost identically: near-equal distances, the same nearest
    # neighbour for nearly every query
    assert (I_bf[:, 0] == I_ref[:, 0]).mean() >= 0.9
    np.testing.assert_allclose(D_bf[:, 0], D_ref[:, 0], rtol=0.05)
    # re-ranking only the best 3: those 3 decoded exactly (a subset of the lookup-table top 3),
    # then the lookup-table ranking from position 3 on
    np.testing.assert_array_equal(np.sort(I_r3[:, :3], axis=1), np.sort(I_lut[:, :3], axis=1))
    assert (np.diff(D_r3[:, :3], axis=1) >= 0).all()
    np.testing.assert_array_equal(I_r3[:, 3:], I_lut[:, 3:])
    np.testing.assert_array_equal(D_r3[:, 3:], D_lut[:, 3:])
    # a shortlist of k ranks by the LUT only, which must differ somewhere: the re-rank matters
    assert not np.array_equal(I_small, I_ref)
    # the LUT ranking is the exact top-k over the row-scaled additive reconstructions c + a r
    from pipeline.codec.additive import decode_additive
    from pipeline.codec.decoder import model_row_scales

    a_N = model_row_scales(model, codes, lists).astype(np.float64)
    assert np.abs(a_N - 1).max() > 0.01  # the scales matter
    cb = model.additive_MKD.detach().numpy()
    x_s = cent[lists] + a_N[:, None] * decode_additive(cb, codes)
    D_s = np.where(in_probe, sqdist_rows(q, np.broadcast_to(x_s, (len(q),) + x_s.shape)), np.inf)
    D_s, I_s = topk_smallest(D_s, np.where(in_probe, np.arange(len(x_s))[None, :], -1), k)
    np.testing.assert_array_equal(I_lut, I_s)
    np.testing.assert_allclose(D_lut, D_s, rtol=1e-4, atol=1e-3)


def test_stored_row_scales_search_like_computed_ones(indexes, tiny_index_inputs):
    """The shards' lut_scale column is what a search would compute: searching with the stored
    scales, with scales computed at load (shards written without the column) or with a mix gives
    the same shortlists; lut_scales off ignores them."""
    from pipeline.search.scan import build_searcher
    from pipeline.index.shards import load_shard_rows

    inp = tiny_index_inputs
    model, q = inp["model_obj"], inp["q"]
    m = load_manifest(indexes["three"])
    lists, ids, codes, offsets, stored = load_shard_rows(version_dir(indexes["three"], m.version),
                                                     [s.to_dict() for s in m.shards], model.config.nlist,
                                                     model.config.M)
    assert stored.dtype == np.float16 and not np.isnan(stored).any()
    mixed = stored.copy()
    mixed[::3] = np.nan  # rows of shards without the column
    searchers = [build_searcher(model, lists, ids, codes, offsets, scale_N=s) for s in (stored, None, mixed)]
    np.testing.assert_allclose(searchers[1].scale_N, stored, rtol=1e-3)
    np.testing.assert_array_equal(searchers[2].scale_N[1::3], stored[1::3])
    _, lp = searchers[0].probe(q, 3)
    ref = searchers[0].lut_search(q, lp, 20)
    for s in searchers[1:]:
        D, I, _ = s.lut_search(q, lp, 20)
        assert (I == ref[1]).mean() > 0.99
        np.testing.assert_allclose(D, ref[0], rtol=1e-3, atol=1e-3)
    plain = build_searcher(model, lists, ids, codes, offsets, scale_N=stored, lut_scales=False)
    assert plain.scale_N is None and not np.array_equal(plain.lut_search(q, lp, 20)[1], ref[1])
    with pytest.raises(ConfigError, match="row scales have shape"):
        build_searcher(model, lists, ids, codes, offsets, scale_N=stored[:-1])


def test_killed_shard_actor_is_recovered_mid_batch(indexes, tiny_index_inputs):
    import ray

    q = np.repeat(tiny_index_inputs["q"], 10, axis=0)  # a batch long enough to be in flight
    pool = ShardPool(indexes["three"], workers=2, cpus_per_worker=0.5)
    try:
        D0, I0 = pool.search_batch(q, SearchParams(k=10, nprobe=3, shortlist=40))
        out: dict = {}

        def call():
            try:
                out["res"] = pool.search_batch(q, SearchParams(k=10, nprobe=3, shortlist=40))
            except Exception as e:  # noqa: BLE001
                out["err"] = e

        t = threading.Thread(target=call)
        t.start()
        ray.kill(pool.actors[0], no_restart=False)
        t.join(timeout=120)
        assert not t.is_alive()
        assert "err" not in out, out.get("err")
        np.testing.assert_array_equal(out["res"][1], I0)
        np.testing.assert_array_equal(out["res"][0], D0)
        # the restarted actor keeps answering
        D2, I2 = pool.search_batch(q[:50], SearchParams(k=10, nprobe=3, shortlist=40))
        np.testing.assert_array_equal(I2, I0[:50])
        assert pool.failed_shards() == []
    finally:
        pool.close()


def test_missing_shard_is_named(indexes, tiny_index_inputs, tmp_path):
    m, vdir = _copy_index(indexes["three"], str(tmp_path / "idx"))
    gone = m.shards[1].name
    os.remove(storage.join(vdir, gone))
    with pytest.raises(PipelineError, match=gone.split("/")[-1]):
        ShardPool(str(tmp_path / "idx"), workers=2, cpus_per_worker=0.5)
    I, _, report = _search(str(tmp_path / "idx"), tiny_index_inputs, str(tmp_path / "r"), allow_partial=True)
    assert report["failed_shards"] == [gone]
    assert "missing" in report["failures"][gone]
    s = m.shards[1]
    assert (I >= 0).all() and not ((I >= s.id_min) & (I <= s.id_max)).any()


def test_model_replaced_at_its_uri_is_refused(indexes, tiny_index_inputs, tmp_path):
    """Codes decode only with the model that wrote them: a model retrained into the index's model
    URI is refused, naming it, before any actor starts."""
    from pipeline.codec.model_file import load_model, save_model

    model_uri = str(tmp_path / "model")
    shutil.copytree(tiny_index_inputs["model"], model_uri)
    m, vdir = _copy_index(indexes["three"], str(tmp_path / "idx"))
    mpath = os.path.join(vdir, "manifest.json")
    raw = json.loads(open(mpath).read())
    raw["model"]["uri"] = model_uri
    open(mpath, "w").write(json.dumps(raw, indent=2, sort_keys=True))
    I_ok, _, _ = _search(str(tmp_path / "idx"), tiny_index_inputs, str(tmp_path / "ok"))
    np.testing.assert_array_equal(I_ok, _search(indexes["three"], tiny_index_inputs, str(tmp_path / "ref"))[0])

    other = load_model(model_uri)
    other.set_additive_codebooks(other.additive_MKD * 1.5)
    save_model(other, model_uri)
    with pytest.raises(ConfigError, match="has changed since index version") as ei:
        _search(str(tmp_path / "idx"), tiny_index_inputs, str(tmp_path / "bad"))
    assert model_uri in str(ei.value) and "reencode" in str(ei.value)
    assert not os.path.exists(str(tmp_path / "bad"))


def test_corrupt_shard_fails_or_is_skipped_with_allow_partial(indexes, baseline, tiny_index_inputs, tmp_path):
    m, vdir = _copy_index(indexes["three"], str(tmp_path / "idx"))
    bad = m.shards[0]
    path = storage.join(vdir, bad.name)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(PipelineError, match=bad.name.split("/")[-1]):
        run_search(SearchJobConfig(index_uri=str(tmp_path / "idx"), queries_uri=tiny_index_inputs["query"],
                                   out_uri=str(tmp_path / "never"), workers=2, cpus_per_worker=0.5))
    assert not os.path.exists(str(tmp_path / "never"))  # no half-written output

    I, _, report = _search(str(tmp_path / "idx"), tiny_index_inputs, str(tmp_path / "r"), allow_partial=True)
    assert report["failed_shards"] == [bad.name]
    assert "corrupt" in report["failures"][bad.name]
    # the other two shards are searched: the intact index's best surviving neighbours are found
    I_full = baseline["three"][0]
    outside = (I >= 0) & ((I < bad.id_min) | (I > bad.id_max))
    assert outside.all()
    keep = (I_full < bad.id_min) | (I_full > bad.id_max)
    # every query's best surviving neighbour from the intact index appears in the partial result
    first = np.array([row[k][0] if k.any() else -1 for row, k in zip(I_full, keep)])
    assert np.mean([f in row for f, row in zip(first, I) if f >= 0]) > 0.9


def test_cli_search_then_eval(indexes, tiny_index_inputs, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.search.evaluation import knn_ground_truth, recall_at

    inp = tiny_index_inputs
    _, gt = knn_ground_truth(inp["q"], inp["x"], k=20)
    gt_uri = str(tmp_path / "gt.ivecs")
    vectors.write_vectors(gt_uri, gt.astype(np.int32))
    res = str(tmp_path / "res.bin")
    assert main(["search", "--index", indexes["three"], "--queries", inp["query"], "--out", res,
                 "--k", "10", "--nprobe", "4", "--shortlist", "50", "--workers", "2",
                 "--cpus-per-worker", "0.5"]) == 0
    capsys.readouterr()
    assert main(["eval", "--results", res, "--groundtruth", gt_uri]) == 0
    printed = json.loads(capsys.readouterr().out)
    I, _ = results.read_knn_results(res)
    assert I.shape == (len(inp["q"]), 10)
    expect = recall_at(I, gt, ks=(1, 10))
    assert printed["R@1"] == pytest.approx(expect["R@1"]) and printed["R@10"] == pytest.approx(expect["R@10"])
    # 2-byte codes on clustered Gaussian data: modest recall, but far above ids shuffled across
    # queries, which the same eval path scores near zero
    results.write_knn_results(str(tmp_path / "bad.bin"), np.roll(I, 1, axis=0), np.zeros(I.shape, np.float32))
    assert main(["eval", "--results", str(tmp_path / "bad.bin"), "--groundtruth", gt_uri]) == 0
    assert json.loads(capsys.readouterr().out)["R@10"] < printed["R@10"] / 2
    # --rerank, --rerank-precision and --probe-ratio reach the job and are recorded in its report
    res2 = str(tmp_path / "res2.bin")
    assert main(["search", "--index", indexes["three"], "--queries", inp["query"], "--out", res2,
                 "--k", "10", "--nprobe", "4", "--shortlist", "50", "--rerank", "5",
                 "--rerank-precision", "bfloat16", "--probe-ratio", "1.5", "--workers", "2",
                 "--cpus-per-worker", "0.5"]) == 0
    params = json.loads(open(res2 + ".report.json").read())["params"]
    assert params["params"]["rerank"] == 5 and params["rerank_precision"] == "bfloat16"
    assert params["params"]["probe_ratio"] == 1.5
    I2, _ = results.read_knn_results(res2)
    assert recall_at(I2, gt, ks=(1,))["R@1"] >= 0.8 * expect["R@1"]
    with pytest.raises(SystemExit):
        main(["search", "--index", indexes["three"], "--queries", inp["query"], "--out", res2,
              "--rerank-precision", "float64"])
    with pytest.raises(ConfigError, match="rerank"):
        run_search(SearchJobConfig(index_uri=indexes["three"], queries_uri=inp["query"], out_uri=res2,
                                   params=SearchParams(shortlist=50, rerank=60)))


def test_recall_on_dwsift_subset(ray_session, dwsift_dir, tmp_path):
    """IVF64 + 8-byte RQ-initialised QINCo2 on 20,000 dwsift base vectors: R@10 above a floor
    that shuffled ids, wrong centroid offsets or a wrong LUT cannot reach."""
    from pipeline.codec.model_file import save_model
    from pipeline.search.evaluation import knn_ground_truth, recall_at
    from pipeline.codec.model import QincoConfig
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_model

    learn = vectors.read_vectors(str(dwsift_dir / "learn.bvecs"), max_rows=8000).astype(np.float32)
    base = vectors.read_vectors(str(dwsift_dir / "base.bvecs"), max_rows=20000).astype(np.float32)
    q = vectors.read_vectors(str(dwsift_dir / "query.bvecs"), max_rows=200).astype(np.float32)
    qcfg = QincoConfig(dim=128, M=8, K=256, L=1, de=16, dh=32, A=8, B=2, nlist=64)
    model, _ = train_model(learn[1000:], learn[:1000], qcfg,
                           TrainConfig(epochs=0, val_size=1000, rq_iters=4, additive_max_rows=7000))
    save_model(model, str(tmp_path / "model"))
    vectors.write_vectors(str(tmp_path / "base.fvecs"), base)
    vectors.write_vectors(str(tmp_path / "q.fvecs"), q)
    run_encode(EncodeJobConfig(model_uri=str(tmp_path / "model"), data_uris=[str(tmp_path / "base.fvecs")],
                               index_uri=str(tmp_path / "index"), workers=2, cpus_per_worker=0.5,
                               shard_rows=10000), progress=False)
    report = run_search(SearchJobConfig(index_uri=str(tmp_path / "index"), queries_uri=str(tmp_path / "q.fvecs"),
                                        out_uri=str(tmp_path / "res"), params=SearchParams(k=10, nprobe=8, shortlist=50),
                                        workers=2, cpus_per_worker=0.5))
    assert report["shards"] == 2 and report["failed_shards"] == []
    I, _ = results.read_knn_results(str(tmp_path / "res"))
    _, gt = knn_ground_truth(q, base, k=1)
    rec = recall_at(I, gt, ks=(1, 10))
    # measured: R@1 0.33, R@10 0.77; shuffled ids or a wrong LUT / centroid give ~0.
    assert rec["R@10"] > 0.6, rec
    assert rec["R@1"] > 0.25, rec


def test_shards_are_placed_within_the_memory_per_actor():
    from pipeline.distributed.shard_pool import assign_shards, actor_bytes

    shards = [{"name": f"shards/s{i}", "rows": 10_000_000} for i in range(10)]  # 100M vectors
    groups = assign_shards(shards, 4, code_bytes=16, memory_per_actor=4 << 30)
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3]
    assert max(actor_bytes(sum(e["rows"] for e in g), 16) for g in groups) <= 4 << 30
    with pytest.raises(ConfigError, match=r"100,000,000 vectors of 16 bytes; 2 shard actors of 4.00 GiB cannot "
                                          r"hold them .* use --workers 3 or more"):
        assign_shards(shards, 2, code_bytes=16, memory_per_actor=4 << 30)
    with pytest.raises(ConfigError, match=r"its largest shard \(shards/s0, 10,000,000 rows\) alone needs 1.3"):
        assign_shards(shards, 20, code_bytes=16, memory_per_actor=1 << 30)


def test_memory_mapped_rows_are_placed_by_their_largest_shard():
    from pipeline.distributed.shard_pool import assign_shards

    shards = [{"name": f"shards/s{i}", "rows": 10_000_000} for i in range(10)]  # 100M vectors
    groups = assign_shards(shards, 2, code_bytes=16, memory_per_actor=4 << 30, mmap=True)  # in RAM: refused
    assert sorted(len(g) for g in groups) == [5, 5]
    with pytest.raises(ConfigError, match=r"2 shard actors of 1.00 GiB cannot search them with memory-mapped rows"):
        assign_shards(shards, 2, code_bytes=16, memory_per_actor=1 << 30, mmap=True)


def test_search_with_memory_mapped_rows_gives_the_same_results_and_leaves_no_files(indexes, tiny_index_inputs,
                                                                                   tmp_path):
    params = SearchParams(k=10, nprobe=3, shortlist=40)
    cfg = SearchJobConfig(index_uri=indexes["three"], queries_uri=tiny_index_inputs["query"],
                          out_uri=str(tmp_path / "res"), params=params, workers=2, cpus_per_worker=0.5)
    mm = tmp_path / "mm"
    stale = mm / "qinco-shards-999999999-abc"  # left by a killed actor (no such process)
    stale.mkdir(parents=True)
    want = run_search(cfg)
    got = run_search(cfg.replace(out_uri=str(tmp_path / "res_mm"), mmap_dir=str(mm)))
    I0, D0 = results.read_knn_results(str(tmp_path / "res"))
    I1, D1 = results.read_knn_results(str(tmp_path / "res_mm"))
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    assert all(a["memory_mapped"] for a in got["actors"]) and not any(a["memory_mapped"] for a in want["actors"])
    assert sum(a["rows"] for a in got["actors"]) == 4000
    assert os.listdir(mm) == []  # the actors' files are removed at the end, the stale one at the start
    with pytest.raises(ConfigError, match="local directory"):
        cfg.replace(mmap_dir="s3://bucket/tmp")


def test_a_released_shard_actor_holds_nothing_and_leaves_no_files(indexes, tmp_path):
    m = load_manifest(indexes["three"])
    mm = tmp_path / "mm"
    actor = ShardActor(indexes["three"], m.version, [s.to_dict() for s in m.shards],
                       storage.absolute(m.model["uri"]), mmap_dir=str(mm))
    held = actor.memory()
    assert held["rows"] == 4000 and held["shards"] == 3 and held["shard_bytes"] > 0 and held["memory_mapped"]
    assert len(os.listdir(mm)) == 1 and os.listdir(mm / os.listdir(mm)[0])
    actor.release()
    assert os.listdir(mm) == []
    after = actor.memory()
    assert (after["rows"], after["shards"], after["shard_bytes"]) == (0, 0, 0)


def test_search_refuses_an_index_larger_than_the_actors_memory_and_reports_it(indexes, tiny_index_inputs, tmp_path):
    params = SearchParams(k=10, nprobe=3, shortlist=40)
    cfg = SearchJobConfig(index_uri=indexes["three"], queries_uri=tiny_index_inputs["query"],
                          out_uri=str(tmp_path / "res"), params=params, workers=2, cpus_per_worker=0.5,
                          memory_per_actor=256 << 20)
    with pytest.raises(ConfigError, match="2 shard actors of 0.25 GiB cannot hold them"):
        run_search(cfg)
    assert not os.path.exists(tmp_path / "res")
    report = run_search(cfg.replace(memory_per_actor=1 << 30))
    actors = report["actors"]
    assert len(actors) == 2 and sum(a["rows"] for a in actors) == 4000 and sum(a["shards"] for a in actors) == 3
    assert all(a["shard_bytes"] >= a["rows"] * 14 and a["peak_rss_bytes"] > a["shard_bytes"] for a in actors)


def test_pairwise_stage_in_the_job_equals_the_in_process_searcher(indexes, tiny_index_inputs, tmp_path):
    """With the pairwise stage, three shards answer like the in-process searcher over all rows,
    and the stage changes which candidates reach the QINCo re-rank. A model without a pairwise
    decoder is refused by name."""
    from pipeline.codec.decoder import Decoder, model_pairwise, model_row_scales
    from pipeline.codec.encoder import encode
    from pipeline.codec.model_file import load_model, save_model
    from pipeline.search.scan import build_searcher

    inp = tiny_index_inputs
    model = load_model(inp["model"])
    assert model_pairwise(model) is not None  # fitted by training
    kw = dict(shortlist=40, pairwise=12, rerank=4)
    I3, D3, r3 = _search(indexes["three"], inp, str(tmp_path / "three"), **kw)
    assert r3["shards"] == 3 and r3["params"]["params"]["pairwise"] == 12
    codes, lists = encode(model, inp["x"])
    order = np.lexsort((np.arange(len(lists)), lists))
    offsets = np.searchsorted(lists[order], np.arange(model.config.nlist + 1))
    s = build_searcher(model, lists[order], order, codes[order], offsets, decode_fn=Decoder(model),
                       scale_N=model_row_scales(model, codes[order], lists[order]))
    D_ref, I_ref = s.search(inp["q"], SearchParams(k=10, nprobe=3, **kw))
    np.testing.assert_array_equal(I3, I_ref)
    np.testing.assert_allclose(D3, D_ref, rtol=1e-6)
    I_off, _, _ = _search(indexes["three"], inp, str(tmp_path / "off"), shortlist=40, rerank=4)
    assert not np.array_equal(I_off, I3)
    model.set_pairwise(np.zeros((0, 2)), np.zeros((0, model.config.K ** 2, model.config.dim)))
    save_model(model, str(tmp_path / "plain_model"))
    plain = _encode({**inp, "model": str(tmp_path / "plain_model")}, str(tmp_path / "plain"), 4000)
    with pytest.raises(ConfigError, match="needs a model with a pairwise decoder"):
        _search(plain, inp, str(tmp_path / "bad"), **kw)


def test_target_recall_chooses_a_setting_that_reaches_it_through_the_job(indexes, tiny_index_inputs, tmp_path):
    """--target-recall: the job tunes on queries with ground truth, searches with its choice, and
    the results reach the recall it promised; the report records the choice and the points."""
    from pipeline.search.evaluation import knn_ground_truth
    from pipeline.stages.search import TuneSpec, evaluate_results

    inp = tiny_index_inputs
    # queries near base rows (the fixture's own queries lie between its clusters); 4-byte codes of
    # these vectors reach an R@10 of about 0.37 at best
    q = inp["x"][::40] + np.random.default_rng(5).normal(0, 0.5, (100, inp["x"].shape[1])).astype(np.float32)
    vectors.write_vectors(str(tmp_path / "q.fvecs"), q)
    gt = knn_ground_truth(q, inp["x"], k=10)[1]
    vectors.write_vectors(str(tmp_path / "gt.ivecs"), gt.astype(np.int32))
    out = str(tmp_path / "tuned")
    report = run_search(SearchJobConfig(
        index_uri=indexes["three"], queries_uri=str(tmp_path / "q.fvecs"), out_uri=out, params=SearchParams(k=10),
        workers=2, cpus_per_worker=0.5, tune=TuneSpec(target_recall=0.3, groundtruth_uri=str(tmp_path / "gt.ivecs"), max_rerank=50)))
    tuning = report["tuning"]
    assert tuning["recall"] >= 0.3 and tuning["measure"] == "R@10" and tuning["queries"] == len(q)
    chosen = report["search_params"]
    assert chosen == tuning["chosen"]
    assert {"nprobe": chosen["nprobe"], "rerank": chosen["rerank"]} in [
        {"nprobe": p["nprobe"], "rerank": p["rerank"]} for p in tuning["points"] if p["recall"] >= 0.3]
    assert evaluate_results(out, str(tmp_path / "gt.ivecs"))["R@10"] == tuning["recall"]
    reached = [p for p in tuning["points"] if p["recall"] >= 0.3]
    assert tuning["queries_per_s"] == max(p["queries_per_s"] for p in reached)
    saved = json.loads(open(out + ".report.json").read())
    assert saved["tuning"]["chosen"] == chosen
