"""Search kernels: LUT distances, exact re-rank, sharding + merge, Faiss scanner agreement."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.search import scan as search_kernels
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.search.params import SearchParams
from pipeline.search.scan import ShardSearcher
from pipeline.search.rerank import brute_force_reference
from pipeline.search.rerank import rerank
from pipeline.search.topk import merge_topk

D, NLIST, M, K, N, Q = 16, 8, 4, 16, 2000, 40


def additive_decode(codes_NM, list_ids_N, centroids_LD, codebooks_MKD):
    """``c_l + Σ_m C_m[code_m]`` in float32, centroid first (the order the scanner's terms use)."""
    x_ND = centroids_LD[np.asarray(list_ids_N, dtype=np.int64)].astype(np.float32)
    for m in range(codes_NM.shape[1]):
        x_ND += codebooks_MKD[m][np.asarray(codes_NM)[:, m].astype(np.intp)]
    return x_ND


def make_shard(seed=0, n=N, k_codes=K, n_dup=200):
    """Synthetic shard: rows sorted by list, random codes, some exact duplicate rows."""
    rng = np.random.default_rng(seed)
    centroids = (rng.normal(size=(NLIST, D)) * 3).astype(np.float32)
    codebooks = (rng.normal(size=(M, k_codes, D)) * 0.6 / (1 + np.arange(M))[:, None, None])
    codebooks = codebooks.astype(np.float32)
    list_ids = np.sort(rng.integers(0, NLIST, n)).astype(np.int32)
    codes = rng.integers(0, k_codes, (n, M))
    # duplicates: copy the code of the previous row in the same list -> identical vectors
    dup = rng.choice(np.arange(1, n), n_dup, replace=False)
    dup = dup[list_ids[dup] == list_ids[dup - 1]]
    for r in np.sort(dup):
        codes[r] = codes[r - 1]
    codes = codes.astype(np.uint8 if k_codes <= 256 else np.uint16)
    offsets = np.searchsorted(list_ids, np.arange(NLIST + 1)).astype(np.int64)
    ids = rng.permutation(5 * n)[:n].astype(np.int64)
    queries = (centroids[rng.integers(0, NLIST, Q)] + rng.normal(size=(Q, D))).astype(np.float32)
    return dict(list_ids_N=list_ids, ids_N=ids, codes_NM=codes, list_offsets=offsets,
                centroids_LD=centroids, codebooks_MKD=codebooks), queries


def make_decode(shard):
    """Exact decoder stand-in: additive decode plus a residual ReLU layer. Its products are
    ``pipeline.codec.rowwise``'s, as the QINCo decoder's are, so a row decodes to the same bits in any
    batch (the property ``ShardSearcher`` asks of its ``decode_fn``; a plain ``x @ W`` lacks it on
    OpenBLAS's Haswell kernels, for one)."""
    import torch

    from pipeline.codec.rowwise import linear_rows

    cent, cb = shard["centroids_LD"], shard["codebooks_MKD"]
    rng = np.random.default_rng(123)
    W1 = torch.from_numpy(rng.normal(size=(2 * D, D)).astype(np.float32))
    W2 = torch.from_numpy(rng.normal(size=(D, 2 * D)).astype(np.float32) * 0.3)

    def decode_fn(codes_NM, list_ids_N):
        decode_fn.calls.append(len(codes_NM))
        x = torch.from_numpy(additive_decode(codes_NM, list_ids_N, cent, cb))
        return (x + linear_rows(torch.relu(linear_rows(x, W1)), W2)).numpy()

    decode_fn.calls = []
    return decode_fn


@pytest.fixture(scope="module")
def data():
    shard, q = make_shard()
    return shard, q, make_decode(shard)


def test_lut_distances_equal_additive_bruteforce(data):
    shard, q, _ = data
    s = ShardSearcher(**shard)
    x = additive_decode(shard["codes_NM"], shard["list_ids_N"], shard["centroids_LD"],
                        shard["codebooks_MKD"]).astype(np.float64)
    exact_QN = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    _, lists = s.probe(q, NLIST)
    D_, I_, rows = s.lut_search(q, lists, N)
    assert (rows >= 0).all() and (np.sort(rows, axis=1) == np.arange(N)).all()
    np.testing.assert_array_equal(I_, shard["ids_N"][rows])
    np.testing.assert_allclose(D_, np.take_along_axis(exact_QN, rows, 1), rtol=1e-4, atol=1e-3)
    assert (np.diff(D_, axis=1) >= 0).all()
    # a short shortlist holds the S nearest additive reconstructions
    D50, _, rows50 = s.lut_search(q, lists, 50)
    np.testing.assert_allclose(D50, np.sort(exact_QN, axis=1)[:, :50], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(rows50, rows[:, :50])


def test_row_scaled_lut_distances_equal_bruteforce_of_scaled_reconstruction(data):
    """With row scales the LUT distance is the exact distance to ``c_l + a_n r_n``."""
    shard, q, _ = data
    a_N = np.random.default_rng(5).uniform(0.5, 1.5, N).astype(np.float16)
    s = ShardSearcher(**shard, scale_N=a_N)
    cent, lids = shard["centroids_LD"], shard["list_ids_N"]
    r = additive_decode(shard["codes_NM"], lids, np.zeros_like(cent), shard["codebooks_MKD"])
    x = cent[lids].astype(np.float64) + a_N.astype(np.float64)[:, None] * r
    exact_QN = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    _, lists = s.probe(q, NLIST)
    D_, I_, rows = s.lut_search(q, lists, N)
    np.testing.assert_array_equal(I_, shard["ids_N"][rows])
    np.testing.assert_allclose(D_, np.take_along_axis(exact_QN, rows, 1), rtol=1e-4, atol=1e-3)
    D50, _, rows50 = s.lut_search(q, lists, 50)
    np.testing.assert_allclose(D50, np.sort(exact_QN, axis=1)[:, :50], rtol=1e-4, atol=1e-3)
    # the scales change the ranking
    assert not np.array_equal(rows50, ShardSearcher(**shard).lut_search(q, lists, 50)[2])
    with pytest.raises(VectorFormatError, match="row scales have shape"):
        ShardSearcher(**shard, scale_N=a_N[:-1])
    bad = a_N.copy()
    bad[7] = np.nan
    with pytest.raises(VectorFormatError, match="NaN"):
        ShardSearcher(**shard, scale_N=bad)


def test_search_all_lists_equals_bruteforce_of_decoder(data):
    shard, q, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    params = SearchParams(k=20, nprobe=NLIST, shortlist=N)
    timings = {}
    D_, I_ = s.search(q, params, timings)
    x_all = decode_fn(shard["codes_NM"], shard["list_ids_N"])
    Dr, Ir = brute_force_reference(q, x_all, shard["ids_N"], 20)
    np.testing.assert_array_equal(I_, Ir)
    np.testing.assert_array_equal(D_, Dr)
    assert D_.dtype == np.float32 and I_.dtype == np.int64
    assert set(timings) == {"probe", "lut", "rerank"}
    # the exact decoder really changes the ranking compared with the additive one
    _, I_lut = ShardSearcher(**shard).search(q, params)
    assert (I_lut != I_).any()


def test_duplicates_break_ties_by_id(data):
    shard, q, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    # query exactly at a duplicated vector: both copies at distance 0, smaller id first
    codes, lists = shard["codes_NM"], shard["list_ids_N"]
    r = next(i for i in range(1, N) if (codes[i] == codes[i - 1]).all()
             and lists[i] == lists[i - 1])
    q0 = decode_fn(codes[r:r + 1], lists[r:r + 1])
    D_, I_ = s.search(q0, SearchParams(k=2, nprobe=NLIST, shortlist=N))
    assert (D_[0] == 0).all()
    assert I_[0].tolist() == sorted(shard["ids_N"][[r - 1, r]].tolist())


def test_small_nprobe_equals_bruteforce_over_probed_lists(data):
    shard, _, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    nprobe, k = 2, 10
    # queries between clusters, so that the probed lists miss true neighbours
    rng = np.random.default_rng(5)
    c = shard["centroids_LD"]
    q = (0.5 * (c[rng.integers(0, NLIST, Q)] + c[rng.integers(0, NLIST, Q)])
         + rng.normal(size=(Q, D))).astype(np.float32)
    D_, I_ = s.search(q, SearchParams(k=k, nprobe=nprobe, shortlist=N))
    _, lists = s.probe(q, nprobe)
    x_all = decode_fn(shard["codes_NM"], shard["list_ids_N"])
    for i in range(Q):
        sel = np.isin(shard["list_ids_N"], lists[i])
        Dr, Ir = brute_force_reference(q[i:i + 1], x_all[sel], shard["ids_N"][sel], k)
        np.testing.assert_array_equal(I_[i], Ir[0])
        np.testing.assert_array_equal(D_[i], Dr[0])
    # probing fewer lists must miss some of the global neighbours for these queries
    _, I_all = s.search(q, SearchParams(k=k, nprobe=NLIST, shortlist=N))
    assert (I_all != I_).any()


def test_flat_probe_finds_the_nearest_centroids_like_faiss():
    """The searcher's exact probe gives Faiss ``IndexFlatL2``'s lists and distances."""
    import faiss

    from pipeline.search.probe import FlatProbe

    rng = np.random.default_rng(3)
    c = rng.normal(size=(300, D)).astype(np.float32) * 2
    q = rng.normal(size=(57, D)).astype(np.float32) * 2
    ref = faiss.IndexFlatL2(D)
    ref.add(c)
    for P in (1, 5, 300):
        Dr, Ir = ref.search(q, P)
        Df, If = FlatProbe(c).search(q, P)
        assert If.dtype == np.int64 and Df.dtype == np.float32 and If.shape == (57, P)
        np.testing.assert_array_equal(If, Ir)
        np.testing.assert_allclose(Df, Dr, rtol=1e-5, atol=1e-4)
    shard, _ = make_shard()
    s = ShardSearcher(**shard)
    _, lists = s.probe(q, 3)
    exact = np.argsort(((q[:, None, :].astype(np.float64) - shard["centroids_LD"][None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(lists, exact[:, :3])


def test_flat_probe_breaks_ties_by_list_id_and_ignores_the_batch():
    """Duplicate centroids tie exactly: the probe keeps the smaller list id first, and a query's
    lists and distances are the same probed alone or in any batch."""
    from pipeline.search.probe import FlatProbe

    rng = np.random.default_rng(11)
    c = rng.normal(size=(40, D)).astype(np.float32)
    c[[7, 23, 31]] = c[3]  # four copies of one centroid
    q = np.concatenate([c[3:4] + 0.01, rng.normal(size=(70, D)).astype(np.float32)])
    probe = FlatProbe(c)
    Dq, Iq = probe.search(q, 6)
    assert Iq[0, :4].tolist() == [3, 7, 23, 31]
    for P in (1, 2, 3):  # the boundary inside the tied group keeps the smallest ids
        assert probe.search(q[:1], P)[1][0].tolist() == [3, 7, 23, 31][:P]
    for a, b in ((0, 1), (5, 6), (10, 37), (0, 71)):
        Db, Ib = probe.search(q[a:b], 6)
        np.testing.assert_array_equal(Ib, Iq[a:b])
        np.testing.assert_array_equal(Db, Dq[a:b])


def test_probe_ratio_visits_only_the_lists_near_the_nearest(data):
    """With ``probe_ratio`` r a query visits, of its nprobe nearest lists, exactly those whose
    centroid is within r times the nearest one's squared distance, and its results are the exact
    top-k over the decoded rows of those lists."""
    from pipeline.search.probe import prune_lists

    shard, _, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    c = shard["centroids_LD"].astype(np.float64)
    rng = np.random.default_rng(7)
    q = (0.5 * (c[rng.integers(0, NLIST, Q)] + c[rng.integers(0, NLIST, Q)])
         + rng.normal(size=(Q, D))).astype(np.float32)
    nprobe, ratio, k = 4, 1.5, 10
    _, lists = s.probe(q, nprobe)
    kept = prune_lists(q, lists, shard["centroids_LD"], ratio)
    d_QL = ((q.astype(np.float64)[:, None, :] - c[None]) ** 2).sum(-1)
    for i in range(Q):
        want = [l for l in lists[i] if d_QL[i, l] <= ratio * d_QL[i, lists[i]].min()]
        assert sorted(kept[i][kept[i] >= 0].tolist()) == sorted(want)
    n_kept = (kept >= 0).sum(1)
    assert n_kept.min() >= 1 and 1 < n_kept.mean() < nprobe  # some queries visit fewer lists
    assert prune_lists(q, lists, shard["centroids_LD"], None) is lists
    np.testing.assert_array_equal(prune_lists(q, lists, shard["centroids_LD"], 1e9), lists)

    D_, I_ = s.search(q, SearchParams(k=k, nprobe=nprobe, shortlist=N, probe_ratio=ratio))
    x_all = decode_fn(shard["codes_NM"], shard["list_ids_N"])
    for i in range(Q):
        sel = np.isin(shard["list_ids_N"], kept[i][kept[i] >= 0])
        Dr, Ir = brute_force_reference(q[i:i + 1], x_all[sel], shard["ids_N"][sel], k)
        np.testing.assert_array_equal(I_[i], Ir[0])
        np.testing.assert_array_equal(D_[i], Dr[0])
    # a query's lists do not depend on the batch it comes in
    np.testing.assert_array_equal(prune_lists(q[5:6], lists[5:6], shard["centroids_LD"], ratio), kept[5:6])
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="probe_ratio"):
            SearchParams(probe_ratio=bad).validate()


def test_rerank_subset_and_dedup(data):
    shard, q, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    params = SearchParams(k=5, nprobe=4, shortlist=60, rerank=30)
    _, lists = s.probe(q, params.nprobe)
    _, _, rows = s.lut_search(q, lists, params.shortlist)
    decode_fn.calls.clear()
    D_, I_ = s.search(q, params)
    # each distinct shortlisted row is decoded exactly once for the batch, however many queries
    # shortlisted it
    r = rows[:, :30].ravel()
    assert sum(decode_fn.calls) == len(np.unique(r)) < r.size
    x_all = decode_fn(shard["codes_NM"], shard["list_ids_N"])
    for i in range(Q):
        r = rows[i, :30]
        Dr, Ir = brute_force_reference(q[i:i + 1], x_all[r], shard["ids_N"][r], 5)
        np.testing.assert_array_equal(I_[i], Ir[0])
        np.testing.assert_array_equal(D_[i], Dr[0])


def test_rerank_fewer_than_k_keeps_the_lookup_table_tail(data):
    """rerank=R < k: the R best shortlisted codes re-ranked exactly, then shortlist entries
    R..k-1 in lookup-table order with their lookup-table distances."""
    shard, q, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    _, lists = s.probe(q, 3)
    D_lut, I_lut, rows = s.lut_search(q, lists, 20)
    decode_fn.calls.clear()
    D_, I_ = s.search(q, SearchParams(k=10, nprobe=3, shortlist=20, rerank=4))
    r = rows[:, :4].ravel()  # only the best 4 were decoded
    assert sum(decode_fn.calls) == len(np.unique(r))
    r4 = rows[:, :4]
    D_r, I_r = rerank(decode_fn, q, shard["ids_N"][r4], shard["codes_NM"][r4], shard["list_ids_N"][r4], 4)
    np.testing.assert_array_equal(I_[:, :4], I_r)
    np.testing.assert_array_equal(D_[:, :4], D_r)
    np.testing.assert_array_equal(I_[:, 4:], I_lut[:, 4:10])
    np.testing.assert_array_equal(D_[:, 4:], D_lut[:, 4:10])
    assert (np.sort(I_, axis=1)[:, 1:] != np.sort(I_, axis=1)[:, :-1]).all()  # no duplicates
    # the exact re-rank really reorders the head somewhere
    assert not np.array_equal(I_[:, :4], I_lut[:, :4])


def _split(shard, n_shards, seed=7):
    """Partition rows into shards, each keeping the list-sorted layout."""
    owner = np.random.default_rng(seed).integers(0, n_shards, N)
    parts = []
    for j in range(n_shards):
        sel = owner == j
        li = shard["list_ids_N"][sel]
        parts.append(dict(shard, list_ids_N=li, ids_N=shard["ids_N"][sel],
                          codes_NM=shard["codes_NM"][sel],
                          list_offsets=np.searchsorted(li, np.arange(NLIST + 1))))
    return parts


def test_three_shards_merged_equal_one_shard(data):
    shard, q, decode_fn = data
    parts = _split(shard, 3)
    for with_decoder, params in [(True, SearchParams(k=15, nprobe=3, shortlist=N)),
                                 (False, SearchParams(k=15, nprobe=3))]:
        fn = decode_fn if with_decoder else None
        one = ShardSearcher(**shard, decode_fn=fn).search(q, params)
        many = [ShardSearcher(**p, decode_fn=fn).search(q, params)
                for p in parts]
        merged = merge_topk(many, params.k)
        np.testing.assert_array_equal(merged[1], one[1])
        np.testing.assert_allclose(merged[0], one[0], rtol=1e-6)
        assert (merged[1] >= 0).all()


def test_large_k_uint16_codes_and_non_power_of_two():
    for k_codes in (300, 512):
        shard, q = make_shard(seed=3, n=600, k_codes=k_codes, n_dup=0)
        assert shard["codes_NM"].dtype == np.uint16
        s_np = ShardSearcher(**shard)
        x = additive_decode(shard["codes_NM"], shard["list_ids_N"], shard["centroids_LD"],
                            shard["codebooks_MKD"])
        Dr, Ir = brute_force_reference(q, x, shard["ids_N"], 10)
        D_, I_ = s_np.search(q, SearchParams(k=10, nprobe=NLIST))
        assert (I_ == Ir).mean() > 0.99
        np.testing.assert_allclose(D_, Dr, rtol=1e-4, atol=1e-3)


def test_padding_when_lists_are_small(data):
    shard, q, decode_fn = data
    s = ShardSearcher(**shard, decode_fn=decode_fn)
    _, lists = s.probe(q[:2], 1)
    n_avail = np.diff(shard["list_offsets"])[lists[:, 0]]
    for s in (ShardSearcher(**shard, decode_fn=decode_fn),):
        big = int(n_avail.max()) + 5
        D_, I_, rows = s.lut_search(q[:2], lists, big)
        for i in range(2):
            assert (I_[i, :n_avail[i]] >= 0).all() and (I_[i, n_avail[i]:] == -1).all()
            assert np.isinf(D_[i, n_avail[i]:]).all() and (rows[i, n_avail[i]:] == -1).all()
        safe = np.maximum(rows, 0)
        I_rows = np.where(rows >= 0, shard["ids_N"][safe], -1)
        Dk, Ik = rerank(decode_fn, q[:2], I_rows, shard["codes_NM"][safe], shard["list_ids_N"][safe], big)
        assert ((Ik >= 0).sum(1) == n_avail).all() and np.isinf(Dk[Ik < 0]).all()


def test_merge_topk_ties_padding_and_short_inputs():
    D1 = np.array([[1.0, 2.0, np.inf]], np.float32)
    I1 = np.array([[9, 4, -1]])
    D2 = np.array([[1.0, 2.0, 0.5]], np.float32)
    I2 = np.array([[3, 7, -1]])          # id -1 with a finite distance is still padding
    D_, I_ = merge_topk([(D1, I1), (D2, I2)], 6)
    assert I_.tolist() == [[3, 9, 4, 7, -1, -1]]
    assert D_[0, :4].tolist() == [1.0, 1.0, 2.0, 2.0] and np.isinf(D_[0, 4:]).all()
    D_, I_ = merge_topk([(D1, I1), (D2, I2)], 3)
    assert I_.tolist() == [[3, 9, 4]]
    # many ties at the k boundary are resolved by id regardless of input order
    rng = np.random.default_rng(0)
    Dt = np.zeros((3, 50), np.float32)
    It = np.stack([rng.permutation(50) for _ in range(3)])
    _, I_ = merge_topk([(Dt[:, :20], It[:, :20]), (Dt[:, 20:], It[:, 20:])], 5)
    assert (I_ == np.arange(5)).all()
    with pytest.raises(ValueError):
        merge_topk([(D1, I1), (np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64))], 2)


def test_bad_inputs_raise_clear_errors(data):
    shard, q, _ = data
    codes = shard["codes_NM"].copy()
    codes[123, 2] = K
    with pytest.raises(VectorFormatError, match=r"s3://b/shard-0.*row 123"):
        ShardSearcher(**dict(shard, codes_NM=codes), source="s3://b/shard-0")
    lids = shard["list_ids_N"].copy()
    lids[500] = (lids[500] + 1) % NLIST
    with pytest.raises(VectorFormatError, match="row 500"):
        ShardSearcher(**dict(shard, list_ids_N=lids))
    with pytest.raises(VectorFormatError, match="list_offsets"):
        ShardSearcher(**dict(shard, list_offsets=shard["list_offsets"][:-1]))
    s = ShardSearcher(**shard)
    bad_q = q.copy()
    bad_q[4, 0] = np.nan
    with pytest.raises(ConfigError, match="query row 4"):
        s.search(bad_q, SearchParams())
    for bad in (SearchParams(k=0), SearchParams(k=10, shortlist=5),
                SearchParams(k=10, shortlist=50, rerank=60), SearchParams(k=10, shortlist=50, rerank=-1),
                SearchParams(nprobe=0)):
        with pytest.raises(ConfigError):
            s.search(q, bad)
    p = SearchParams(k=3, nprobe=2, shortlist=40, rerank=20)
    assert SearchParams.from_json(p.to_json()) == p


def test_threaded_numpy_scan_equals_one_thread(data):
    import torch

    shard, q, _ = data
    one = ShardSearcher(**shard)
    many = ShardSearcher(**shard, num_threads=3)
    _, lists = one.probe(q, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = one.lut_search(q, lists, 25), many.lut_search(q, lists, 25)
        # The threaded scan runs torch single-threaded inside its threads, then restores it.
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert Q >= 2 * search_kernels.MIN_QUERIES_PER_THREAD  # the batch is really split
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_threaded_search_runs_shortlist_and_rerank_per_thread(data):
    """With several threads each takes a part of the queries through the shortlist and the re-rank
    (torch on one thread inside): the results are those of one thread."""
    import threading

    import torch

    shard, q, dec = data
    seen = []

    def decode_fn(codes_NM, list_ids_N):
        seen.append((threading.get_ident(), torch.get_num_threads(), len(codes_NM)))
        return dec(codes_NM, list_ids_N)

    one = ShardSearcher(**shard, decode_fn=dec)
    many = ShardSearcher(**shard, decode_fn=decode_fn, num_threads=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for params in (SearchParams(k=5, nprobe=3, shortlist=30), SearchParams(k=5, nprobe=2, shortlist=20, rerank=3)):
            seen.clear()
            timings = {}
            for x, y in zip(one.search(q, params), many.search(q, params, timings)):
                np.testing.assert_array_equal(x, y)
            assert torch.get_num_threads() == 2
            # Q = 40 queries: two parts of 20, each decoded once in a pool thread (not after the scan,
            # on this one), torch single-threaded. (Which pool thread runs which part is up to the
            # pool: a thread done with one part may take the other.)
            assert len(seen) == 2 and threading.get_ident() not in {t for t, _, _ in seen}
            assert {n for _, n, _ in seen} == {1}
            assert sorted(timings) == ["lut", "probe", "rerank"]
    finally:
        torch.set_num_threads(before)


def test_chunked_scan_equals_one_chunk(data):
    """Splitting the batch into the NumPy scanner's chunks (bounded candidate buffers) changes nothing."""
    shard, q, _ = data
    whole = ShardSearcher(**shard, scanner="numpy")
    chunked = ShardSearcher(**shard, scan_buffer_entries=300, scanner="numpy")
    _, lists = whole.probe(q, 3)
    assert whole.list_sizes_L[lists].sum(axis=1).min() > 300  # so every chunk holds one query
    for x, y in zip(whole.lut_search(q, lists, 25), chunked.lut_search(q, lists, 25)):
        np.testing.assert_array_equal(x, y)


def test_prefix_stage_keeps_the_nearest_prefix_reconstructions_with_their_full_distances(data):
    """``prefix_search`` keeps the S1 rows of the probed lists nearest to their prefix
    reconstruction ``c_l + Σ_{m<P} C_m[code_m]`` (brute force) and gives each the full lookup-table
    distance of ``lut_search``, bit for bit; ``lut_search`` with the prefix ranks those by it."""
    shard, q, _ = data
    a_N = np.random.default_rng(6).uniform(0.5, 1.5, N).astype(np.float16)
    s = ShardSearcher(**shard, scale_N=a_N)
    P, S1, S = 2, 60, 12
    _, lists = s.probe(q, 3)
    cent, lids, cb = shard["centroids_LD"], shard["list_ids_N"], shard["codebooks_MKD"]
    x_pre = additive_decode(shard["codes_NM"][:, :P], lids, cent, cb[:P]).astype(np.float64)
    in_probe = (lids[None, :, None] == lists[:, None, :]).any(-1)
    exact_QN = np.where(in_probe, ((q[:, None, :].astype(np.float64) - x_pre[None]) ** 2).sum(-1), np.inf)
    Dp, Ip, rows, Df = s.prefix_search(q, lists, P, S1)
    assert Dp.shape == Ip.shape == rows.shape == Df.shape == (Q, S1) and (rows >= 0).all()
    np.testing.assert_array_equal(Ip, shard["ids_N"][rows])
    np.testing.assert_allclose(Dp, np.sort(exact_QN, axis=1)[:, :S1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(Dp, np.take_along_axis(exact_QN, rows, 1), rtol=1e-4, atol=1e-3)
    # the full distances are lut_search's values for the same (query, row) pairs
    D_all, _, rows_all = s.lut_search(q, lists, N)
    full_QN = np.full((Q, N), np.nan, np.float32)
    qi, ci = np.nonzero(rows_all >= 0)
    full_QN[qi, rows_all[qi, ci]] = D_all[qi, ci]
    np.testing.assert_array_equal(Df, np.take_along_axis(full_QN, rows, 1))
    # the shortlist: the best S of those S1 by full distance (ties by id)
    D_s, I_s, rows_s = s.lut_search(q, lists, S, prefix=(P, S1))
    for i in range(Q):
        order = np.lexsort((Ip[i], Df[i]))[:S]
        np.testing.assert_array_equal(I_s[i], Ip[i, order])
        np.testing.assert_array_equal(D_s[i], Df[i, order])
    # the prefix stage really drops candidates of the full ranking with a short S1 ...
    assert not np.array_equal(I_s, s.lut_search(q, lists, S)[1])
    # ... and none when it keeps every probed row
    big = int(in_probe.sum(1).max())
    for x, y in zip(s.lut_search(q, lists, S, prefix=(P, big)), s.lut_search(q, lists, S)):
        np.testing.assert_array_equal(x, y)
    # two threads, small scan chunks: the same
    s2 = ShardSearcher(**shard, scale_N=a_N, num_threads=2, scan_buffer_entries=300)
    for x, y in zip(s2.prefix_search(q, lists, P, S1), (Dp, Ip, rows, Df)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigError, match="prefix_steps must be between 1 and M - 1"):
        s.prefix_search(q, lists, M, S1)
    for bad in (SearchParams(k=10, shortlist=20, prefix_steps=-1),
                SearchParams(k=10, shortlist=20, prefix_steps=2, prefix_shortlist=19)):
        with pytest.raises(ConfigError, match="prefix"):
            s.search(q, bad)
    assert SearchParams(shortlist=20, prefix_steps=2).prefix == (2, 80)


def test_prefix_stage_merged_over_shards_equals_one_shard(data):
    """Shards' prefix-stage results merged on the prefix distance (``merge_candidates``) give the
    shortlist of one shard holding every row."""
    from pipeline.search.merge import merge_shortlists

    shard, q, _ = data
    a_N = np.random.default_rng(7).uniform(0.5, 1.5, N).astype(np.float16)
    P, S1, S = 2, 50, 15
    one = ShardSearcher(**shard, scale_N=a_N)
    _, lists = one.probe(q, 3)
    D1, I1, rows1 = one.lut_search(q, lists, S, prefix=(P, S1))
    parts = []
    owner = np.random.default_rng(7).integers(0, 3, N)  # _split's partition
    for j, p in enumerate(_split(shard, 3)):
        sj = ShardSearcher(**p, scale_N=a_N[owner == j])
        Dp, Ip, rows, Df = sj.prefix_search(q, lists, P, S1)
        codes = np.where(rows[..., None] >= 0, p["codes_NM"][np.maximum(rows, 0)], 0)
        parts.append((Dp, Ip, codes, np.where(rows >= 0, p["list_ids_N"][np.maximum(rows, 0)], -1), Df))
    D, I, codes, lst = merge_shortlists(parts, S, prefix_k=S1)
    np.testing.assert_array_equal(I, I1)
    np.testing.assert_array_equal(D, D1)
    np.testing.assert_array_equal(codes, shard["codes_NM"][rows1])
    np.testing.assert_array_equal(lst, shard["list_ids_N"][rows1])
    # merging the shards' full-distance shortlists instead would keep a different set
    plain = [ShardSearcher(**p, scale_N=a_N[owner == j]).lut_search(q, lists, S, prefix=(P, S1))
             for j, p in enumerate(_split(shard, 3))]
    assert not np.array_equal(merge_topk([(x[0], x[1]) for x in plain], S)[1], I1)


@pytest.mark.parametrize("k_codes, scaled", [(K, False), (K, True), (300, True)])
def test_native_scan_gives_the_numpy_scans_candidates(k_codes, scaled):
    """The compiled scan (``pipeline.search.kernels``) returns exactly the NumPy scanner's
    shortlists and prefix shortlists: the same distances (bit for bit), ids and rows, ties at the
    boundary broken by the smaller id, padding where lists run short, and the same with threads.
    Codes are made to repeat (few distinct codes), so that many candidates tie."""
    shard, q = make_shard(seed=5, k_codes=k_codes, n_dup=400)
    shard["codes_NM"] = (shard["codes_NM"] % 3).astype(shard["codes_NM"].dtype)
    rng = np.random.default_rng(6)
    scale_N = rng.choice([0.75, 1.0, 1.3], N).astype(np.float16) if scaled else None  # few: ties stay
    native = ShardSearcher(**shard, scale_N=scale_N)
    ref = ShardSearcher(**shard, scale_N=scale_N, scanner="numpy")
    threaded = ShardSearcher(**shard, scale_N=scale_N, num_threads=3)
    assert native.scanner == "native" and threaded.scanner == "native"
    for P in (1, 3, NLIST):
        _, lists = native.probe(q, P)
        lists[::5, -1] = -1  # some slots visit no list
        for S in (1, 7, 64, 3 * N):
            a = native.lut_search(q, lists, S)
            b = ref.lut_search(q, lists, S)
            with np.errstate(invalid="ignore"):  # inf - inf in the padding
                tied = np.count_nonzero(np.diff(b[0], axis=1) == 0)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
            for x, y in zip(threaded.lut_search(q, lists, S), b):
                np.testing.assert_array_equal(x, y)
            if S == 64:
                assert tied > 100  # ties are really exercised
            if S == 3 * N:
                assert (b[1] == -1).any()  # and padding
        for steps, S1 in ((1, 30), (M - 1, 200)):
            for x, y in zip(native.prefix_search(q, lists, steps, S1), ref.prefix_search(q, lists, steps, S1)):
                np.testing.assert_array_equal(x, y)


def test_rows_topk_ranks_by_value_then_column():
    """The probe's selection: per row the P smallest (value, column), sorted; NaN left out."""
    from pipeline.search.kernels import rows_topk

    rng = np.random.default_rng(8)
    d = rng.integers(0, 6, (50, 40)).astype(np.float32)  # many ties
    d[3, :] = np.nan
    d[4, ::2] = np.nan
    for P in (1, 4, 40):
        v, i = np.empty((50, P), np.float32), np.empty((50, P), np.int64)
        rows_topk(d, v, i)
        for r in range(50):
            ok = np.flatnonzero(~np.isnan(d[r]))
            order = ok[np.lexsort((ok, d[r, ok]))][:P]
            assert i[r, :len(order)].tolist() == order.tolist()
            np.testing.assert_array_equal(v[r, :len(order)], d[r, order])
            assert (i[r, len(order):] == -1).all() and np.isinf(v[r, len(order):]).all()


def test_unknown_scanner_is_refused(data):
    shard, _, _ = data
    with pytest.raises(ConfigError, match="scanner"):
        ShardSearcher(**shard, scanner="simd")


def test_topk_smallest_equals_a_full_sort_by_distance_then_id():
    """The compiled selection against a full (distance, id) sort: ties, padding (id -1, NaN
    distances), infinite distances, k above the row width, payloads following their entries."""
    from pipeline.search.topk import topk_smallest

    rng = np.random.default_rng(12)
    Q, C = 60, 37
    D = rng.integers(0, 5, (Q, C)).astype(np.float32)
    D[rng.random((Q, C)) < 0.05] = np.inf
    D[rng.random((Q, C)) < 0.05] = np.nan
    I = np.stack([rng.permutation(1000)[:C] for _ in range(Q)]).astype(np.int64)
    I[rng.random((Q, C)) < 0.1] = -1
    payload = rng.integers(0, 10**6, (Q, C))
    for k in (1, 5, C, C + 7):
        Dk, Ik, Pk = topk_smallest(D, I, k, payload_QC=payload)
        assert Dk.shape == Ik.shape == Pk.shape == (Q, k)
        for q in range(Q):
            real = np.flatnonzero((I[q] >= 0) & ~np.isnan(D[q]))
            order = real[np.lexsort((I[q, real], D[q, real]))][:k]
            n = len(order)
            assert Ik[q, :n].tolist() == I[q, order].tolist()
            np.testing.assert_array_equal(Dk[q, :n], D[q, order])
            assert Pk[q, :n].tolist() == payload[q, order].tolist()
            assert (Ik[q, n:] == -1).all() and (Pk[q, n:] == -1).all() and np.isinf(Dk[q, n:]).all()
        D2, I2 = topk_smallest(D, I, k)
        np.testing.assert_array_equal(D2, Dk)
        np.testing.assert_array_equal(I2, Ik)
