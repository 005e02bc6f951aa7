"""Shortlist decoder quality: how well the additive (lookup-table) decoder approximates QINCo.

The search's lookup-table stage ranks candidates with the least-squares additive decoder fitted
to the QINCo codes, each row's residual scaled towards its QINCo reconstruction (row scales);
only its shortlist reaches the neural decoder. This measures, for an index built by
``bench_search.py`` (its ``--work`` directory):

- reconstruction MSE on held-out base vectors of the neural decoder, of the model's additive
  decoder without and with row scales, and of additive decoders refitted on more base rows
  (``--refit-rows``);
- LUT-only R@1 / R@10 at each ``--nprobe`` for each of those additive decoders;
- richer shortlist decoders, to size what they could give: *exact first step* (``--first-step``:
  the first step's network sees only the IVF centroid, so its codewords ``f_0(C_0[k], c_l)`` are
  exact per list; the other steps stay additive, with the model's codebooks or refitted given the
  exact first step, and the sum is scaled per row as the search does; a scan would need a
  ``K``-entry first-step table per (query, probed list) and ``nlist x K x D`` floats), the
  *list-conditioned* additive
  decoder (each step's network evaluated with the list centroid as context, so every IVF list has
  codebooks of its own, ``x ≈ c_l + Σ_m f_m(C_m[code_m], c_l)``; its ranking is what a lookup-table
  scan with one table per (query, probed list) would give), the QINCo2 paper's *pairwise*
  decoder (at most ``--pairs`` tables indexed by two codes, ``K²`` entries each: the library's
  ``pipeline.codec.pairwise.fit_pairwise`` on the refit rows, fitted to their vectors; MSE on
  held-out rows and on its own fitting rows), and *grouped* additive decoders (``--groups``: the IVF lists grouped by k-means of
  their centroids, least-squares codebooks per group fitted on the refit rows; a scan needs one
  table per (query, group touched), so the mean number of groups a query's probed lists touch is
  reported beside the codebooks' size);
- beside them, Faiss IVF-RQ (beam 5) on the same coarse quantizer, trained on the same set
  (``--train-set``): its reconstruction MSE and R@1 / R@10 at the same nprobe.

Writes ``<work>/shortlist_decoder.json`` and the "Shortlist decoder" section of RESULTS.md.

    .venv/bin/python bench/bench_shortlist_decoder.py --dataset glove50 --bytes 16 \
        --work bench/out/search_glove16_lb --train-set learn+base
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search import DEFAULT_RQ_BEAM, faiss_ivf, qinco_searcher, recalls  # noqa: E402
from results_md import update_section  # noqa: E402

BEGIN = "<!-- section: shortlist-decoder (bench/bench_shortlist_decoder.py) -->"
END = "<!-- end section: shortlist-decoder -->"


def mse(x_ND: np.ndarray, xhat_ND: np.ndarray) -> float:
    return float(np.mean(np.sum((np.asarray(xhat_ND, np.float64) - x_ND) ** 2, axis=1)))


def decode_at_centroid(model, codes_NM: np.ndarray, list_ids_N: np.ndarray, batch: int = 65536) -> np.ndarray:
    """``c_l + Σ_m f_m(C_m[code_m], c_l)``: every step's network sees the list centroid as the
    reconstruction so far, so the decoder is additive within a list (raw space, float32)."""
    import torch

    out = np.empty((len(codes_NM), model.config.dim), np.float32)
    with torch.no_grad():
        for a in range(0, len(codes_NM), batch):
            codes = torch.from_numpy(np.asarray(codes_NM[a:a + batch], dtype=np.int64))
            x0_BD = model.initial_xhat(len(codes), torch.from_numpy(np.asarray(list_ids_N[a:a + batch])))
            xhat_BD = x0_BD.clone()
            for m, step in enumerate(model.steps):
                c_BD = step.codebook_KD[codes[:, m]]
                if step.plain:
                    xhat_BD += c_BD
                    continue
                z_BE = step.codeword_table()[codes[:, m]] + step.context(x0_BD)
                xhat_BD += step.finish(z_BE, c_BD)
            out[a:a + batch] = model.denormalise(xhat_BD).numpy()
    return out


def first_step_codewords(model, centroids_LD: np.ndarray) -> np.ndarray:
    """``f_0(C_0[k], c_l)`` for every IVF list ``l`` and code ``k`` (raw space, ``(nlist, K, D)``
    float32): the first step's network sees only the list centroid, so its codeword is exact per
    list. It is the model's own decode of the first code alone, minus the centroid."""
    from pipeline.codec.decoder import decode

    L, K, M = len(centroids_LD), model.config.K, model.config.M
    codes_XM = np.zeros((L * K, M), np.int64)
    codes_XM[:, 0] = np.tile(np.arange(K), L)
    lists_X = np.repeat(np.arange(L), K)
    return (decode(model, codes_XM, lists_X, prefix=1) - centroids_LD[lists_X]).reshape(L, K, -1)


def scaled_towards(base_ND: np.ndarray, resid_ND: np.ndarray, target_ND: np.ndarray) -> np.ndarray:
    """``base + a_n resid`` with ``a_n`` the least-squares scale of ``resid`` towards ``target -
    base``, rounded to float16 (row scales, as ``pipeline.codec.additive.row_scales``)."""
    r = resid_ND.astype(np.float64)
    t = target_ND.astype(np.float64) - base_ND
    rr = np.einsum("nd,nd->n", r, r)
    a = np.where(rr > 0, np.einsum("nd,nd->n", r, t) / np.where(rr > 0, rr, 1.0), 1.0)
    return base_ND + np.clip(a, -16, 16).astype(np.float16).astype(np.float64)[:, None] * r


def rank_probed(searcher, xq_QD: np.ndarray, xhat_ND: np.ndarray, nprobe: int, k: int = 10) -> np.ndarray:
    """Ids of the ``k`` rows of each query's probed lists nearest under the reconstruction
    ``xhat_ND`` (exact distances to it, ties by id): the ranking of a lookup-table scan whose
    tables reproduce that decoder exactly."""
    from pipeline.search.rerank import brute_force_reference

    _, lists_QP = searcher.probe(xq_QD, nprobe)
    I_QK = np.empty((len(xq_QD), k), np.int64)
    for q, lists in enumerate(lists_QP):
        rows = np.concatenate([np.arange(searcher.list_offsets[l], searcher.list_offsets[l + 1]) for l in lists])
        I_QK[q] = brute_force_reference(xq_QD[q:q + 1], xhat_ND[rows], searcher.ids_N[rows], k)[1][0]
    return I_QK


def fit_grouped(codes_NM: np.ndarray, x_ND: np.ndarray, list_ids_N: np.ndarray, centroids_LD: np.ndarray,
                K: int, n_groups: int, fit_rows: np.ndarray, ridge: float = 1e-3, seed: int = 1):
    """Additive codebooks per group of IVF lists: the lists are grouped by k-means over their
    centroids, and each group's codebooks are the least-squares fit on its rows among
    ``fit_rows``. Returns ``(group_L, xhat_ND)``, the group of each list and the reconstruction of
    every row with its group's codebooks (a group with no fitting row decodes to the centroid)."""
    import faiss

    from pipeline.codec.additive import decode_additive, fit_additive_decoder

    km = faiss.Kmeans(centroids_LD.shape[1], n_groups, niter=20, seed=seed)
    km.train(centroids_LD)
    group_L = km.index.search(centroids_LD, 1)[1][:, 0]
    group_N = group_L[list_ids_N]
    in_fit = np.zeros(len(codes_NM), bool)
    in_fit[fit_rows] = True
    xhat_ND = centroids_LD[list_ids_N].astype(np.float32)
    for g in range(n_groups):
        rows = np.flatnonzero(group_N == g)
        fit = rows[in_fit[rows]]
        if fit.size:
            cb = fit_additive_decoder(codes_NM[fit], x_ND[fit], K, list_ids_N[fit], centroids_LD, ridge=ridge)
            xhat_ND[rows] = decode_additive(cb, codes_NM[rows], list_ids_N[rows], centroids_LD)
    return group_L, xhat_ND


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="glove50")
    ap.add_argument("--bytes", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", required=True, help="a bench_search.py --work directory (model and index)")
    ap.add_argument("--train-set", choices=["learn", "learn+base"], default="learn",
                    help="training set of the Faiss IVF-RQ baseline (as in bench_search.py)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--refit-rows", type=int, nargs="*", default=[240000])
    ap.add_argument("--holdout", type=int, default=20000, help="base rows kept out of every refit")
    ap.add_argument("--pairs", type=int, default=4, help="pairwise tables fitted greedily (0: none)")
    ap.add_argument("--groups", type=int, nargs="*", default=[8, 32],
                    help="grouped additive decoders: codebooks per group of IVF lists, fitted on the refit rows")
    ap.add_argument("--group-ridge", type=float, default=1e-3)
    ap.add_argument("--first-step", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the decoders with the first step exact per IVF list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)

    import faiss
    import torch

    from pipeline.io import vectors
    from pipeline.codec.additive import decode_additive, fit_additive_decoder
    from pipeline.sysinfo import machine_info
    from pipeline.stages.datasets import resolve_dataset
    from pipeline.codec.decoder import decode
    from pipeline.codec.pairwise import PairwiseDecoder, fit_pairwise
    from pipeline.search.params import SearchParams
    from pipeline.search.scan import ShardSearcher

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    work = pathlib.Path(a.work)
    ds = resolve_dataset(a.dataset, a.data_dir)
    xt = vectors.read_vectors(ds.learn).astype(np.float32)
    xb = vectors.read_vectors(ds.base).astype(np.float32)
    xq = vectors.read_vectors(ds.query, max_rows=a.queries).astype(np.float32)
    gt = vectors.read_vectors(ds.groundtruth, max_rows=a.queries)[:, 0].astype(np.int64)
    centroids = np.load(work / f"{a.dataset}_ivf{a.nlist}_learn{len(xt)}.npy")
    searcher, model = qinco_searcher(str(work / f"{a.dataset}_{a.bytes}B" / "index"), a.threads)
    x_N = xb[searcher.ids_N]  # base vectors in shard row order
    hold = np.arange(searcher.N - a.holdout, searcher.N)  # the last rows: never refitted on
    rng = np.random.default_rng(0)

    def lut_recalls(codebooks_MKD: np.ndarray, scale_N: np.ndarray | None = None) -> dict:
        s = ShardSearcher(searcher.list_ids_N, searcher.ids_N, searcher.codes_NM, searcher.list_offsets,
                          centroids, codebooks_MKD, num_threads=a.threads, scale_N=scale_N)
        out = {}
        for p in a.nprobe:
            _, I = s.search(xq, SearchParams(k=10, nprobe=p, shortlist=10))
            out[p] = recalls(I, gt)
        return out

    def additive_row(name: str, codebooks_MKD: np.ndarray) -> dict:
        xh = decode_additive(codebooks_MKD, searcher.codes_NM[hold], searcher.list_ids_N[hold], centroids)
        return {"decoder": name, "mse": mse(x_N[hold], xh), "recalls": lut_recalls(codebooks_MKD)}

    rows = []
    t = time.perf_counter()
    xh = decode(model, searcher.codes_NM[hold], searcher.list_ids_N[hold])
    rows.append({"decoder": "QINCo (neural)", "mse": mse(x_N[hold], xh), "recalls": {}})
    rows.append(additive_row("additive, the model's", searcher.codebooks_MKD))
    # The search's default: the model's additive residual scaled per row towards the neural decode.
    a_N = searcher.scale_N.astype(np.float64)
    xs = centroids[searcher.list_ids_N[hold]] + a_N[hold, None] * decode_additive(
        searcher.codebooks_MKD, searcher.codes_NM[hold])
    rows.append({"decoder": "additive, the model's, with row scales (the search's default; 2 bytes per vector, "
                            "from each row's own QINCo decode)",
                 "mse": mse(x_N[hold], xs), "recalls": lut_recalls(searcher.codebooks_MKD, searcher.scale_N)})
    for n in a.refit_rows:
        sel = rng.choice(searcher.N - a.holdout, min(n, searcher.N - a.holdout), replace=False)
        cb = fit_additive_decoder(searcher.codes_NM[sel], x_N[sel], searcher.K, searcher.list_ids_N[sel],
                                  centroids)
        rows.append(additive_row(f"additive, refitted on {len(sel):,} base rows", cb))
    if a.pairs and a.refit_rows:
        # The pairwise decoder (pipeline.codec.pairwise) over the last refitted additive decoder, fitted
        # to the vectors of the same rows (qinco train fits it to their QINCo reconstructions)
        pairs, tables = fit_pairwise(searcher.codes_NM[sel], x_N[sel], searcher.K, cb, searcher.list_ids_N[sel],
                                     centroids, max_pairs=a.pairs, max_bytes=1 << 40)
        pw = PairwiseDecoder(cb, pairs, tables, centroids)
        rows.append({"decoder": f"additive refitted + {len(pairs)} pairwise tables (pairs "
                                f"{', '.join(f'{i}-{j}' for i, j in pairs)}; MSE on its {len(sel):,} fitting rows "
                                f"{mse(x_N[sel], pw(searcher.codes_NM[sel], searcher.list_ids_N[sel])):.3f})",
                     "mse": mse(x_N[hold], pw(searcher.codes_NM[hold], searcher.list_ids_N[hold])), "recalls": {}})
    for G in a.groups if a.refit_rows else []:
        group_L, xg = fit_grouped(searcher.codes_NM, x_N, searcher.list_ids_N, centroids, searcher.K, G, sel,
                                  a.group_ridge)
        _, lists_QP = searcher.probe(xq, max(a.nprobe))
        touched = {p: np.mean([len(np.unique(group_L[ls[:p]])) for ls in lists_QP]) for p in a.nprobe}
        n_par = G * searcher.M * searcher.K * searcher.D
        rows.append({"decoder": f"additive per group of IVF lists, {G} groups (k-means of the centroids), refitted "
                                f"on the same rows, ridge {a.group_ridge:g}: {n_par:,} codebook floats "
                                f"({n_par / searcher.N:.0f} per indexed vector); groups per query (tables per "
                                f"query) at nprobe " + " / ".join(f"{touched[p]:.1f}" for p in a.nprobe),
                     "mse": mse(x_N[hold], xg[hold]),
                     "recalls": {p: recalls(rank_probed(searcher, xq, xg, p), gt) for p in a.nprobe}})
    if a.first_step and model.ivf and a.refit_rows:
        # The first step's codeword is exact per list; the other steps stay additive (the model's
        # codebooks, or refitted given the exact first step), the sum scaled per row towards the
        # row's QINCo decode. A scan would need a K-entry first-step table per (query, probed list).
        xhat_ND = np.concatenate([decode(model, searcher.codes_NM[i:i + 65536], searcher.list_ids_N[i:i + 65536])
                                  for i in range(0, searcher.N, 65536)])
        f0_LKD = first_step_codewords(model, centroids)
        lids = searcher.list_ids_N.astype(np.int64)
        c_ND = centroids[lids].astype(np.float64)
        F0_ND = f0_LKD[lids, searcher.codes_NM[:, 0].astype(np.int64)].astype(np.float64)
        rest_model = decode_additive(searcher.codebooks_MKD[1:], searcher.codes_NM[:, 1:]).astype(np.float64)
        cb_rest = fit_additive_decoder(searcher.codes_NM[sel][:, 1:], x_N[sel] - centroids[lids[sel]] - F0_ND[sel],
                                       searcher.K)
        rest_refit = decode_additive(cb_rest, searcher.codes_NM[:, 1:]).astype(np.float64)
        tables = (f"{f0_LKD.size:,} first-step floats ({f0_LKD.size / searcher.N:.0f} per indexed vector); "
                  f"a {searcher.K} x {searcher.D} product per (query, probed list)")
        for name, rest in [("the model's additive codebooks for the other steps", rest_model),
                           (f"the other steps' additive codebooks refitted on the same {len(sel):,} rows "
                            f"given the exact first step", rest_refit)]:
            xf = scaled_towards(c_ND, F0_ND + rest, xhat_ND)
            rows.append({"decoder": f"exact first step per IVF list + {name}, with row scales: {tables}",
                         "mse": mse(x_N[hold], xf[hold]),
                         "recalls": {p: recalls(rank_probed(searcher, xq, xf.astype(np.float32), p), gt)
                                     for p in a.nprobe}})
    xc = decode_at_centroid(model, searcher.codes_NM, searcher.list_ids_N)
    rows.append({"decoder": "list-conditioned additive (networks at the list centroid)",
                 "mse": mse(x_N[hold], xc[hold]),
                 "recalls": {p: recalls(rank_probed(searcher, xq, xc, p), gt) for p in a.nprobe}})
    xtrain = xt if a.train_set == "learn" else np.concatenate([xt, xb])
    index, train_s, add_s = faiss_ivf("IVF-RQ", centroids, xtrain, xb, a.bytes)
    del xtrain
    index.make_direct_map()
    rq_rows = np.asarray(searcher.ids_N[hold], dtype=np.int64)
    xh_rq = index.reconstruct_batch(rq_rows)
    rq = {"decoder": f"Faiss IVF-RQ (beam {DEFAULT_RQ_BEAM}, trained on {a.train_set})",
          "mse": mse(xb[rq_rows], xh_rq), "recalls": {}}
    for p in a.nprobe:
        index.nprobe = p
        rq["recalls"][p] = recalls(index.search(xq, 10)[1], gt)
    rows.append(rq)
    elapsed = time.perf_counter() - t

    command = "python bench/bench_shortlist_decoder.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    m = machine_info()
    head = "| decoder | MSE (held-out base) | " + " | ".join(f"R@1 / R@10 nprobe {p}" for p in a.nprobe) + " |"
    table = [head, "|:--|--:|" + "--:|" * len(a.nprobe)]
    for r in rows:
        cells = [f"{r['recalls'][p][0]:.3f} / {r['recalls'][p][1]:.3f}" if p in r["recalls"] else "-"
                 for p in a.nprobe]
        table.append(f"| {r['decoder']} | {r['mse']:.4g} | " + " | ".join(cells) + " |")
    section = "\n".join([
        "## Shortlist decoder: additive (lookup-table) decoder against QINCo and Faiss IVF-RQ", "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {elapsed:.0f} s",
        f"- command: `{command.strip()}`",
        f"- protocol: {a.dataset} {a.bytes} B, the IVF-QINCo model and index of `{a.work}`; MSE = mean squared "
        f"L2 error of the reconstruction of the last {a.holdout:,} base rows of the index (kept out of every "
        f"refit); R@1 / R@10 of the lookup-table ranking alone (no re-rank), {a.queries} queries, shortlist 10 "
        f"(for the exact-first-step and list-conditioned decoders: exact distances to their reconstructions over the probed lists); "
        f"pairwise tables chosen on {a.holdout:,} of the refit rows and fitted on the rest; "
        f"for the grouped decoders, as for the list-conditioned one, R@1 / R@10 are those of exact distances to "
        f"their reconstructions over the probed lists (what a scan with one table per (query, group) gives); "
        f"Faiss IVF-RQ on the same coarse quantizer, trained in this run (train {train_s:.0f} s, add {add_s:.0f} s).",
        "", *table, ""])
    update_section(pathlib.Path(a.results_md), BEGIN, END, section)
    (work / "shortlist_decoder.json").write_text(json.dumps(
        {"command": command, "rows": rows, "machine": m}, indent=2, default=float))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
