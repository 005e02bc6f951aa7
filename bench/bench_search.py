"""Search quality vs speed: IVF-QINCo (this pipeline) beside Faiss IVF-PQ and IVF-RQ.

For each dataset and code size, with one IVF coarse quantizer (k-means on learn) shared by all
methods:

- IVF-QINCo: a QINCo2 model trained on learn (CPU preset, wall-time budget), the base encoded
  by the Ray encode job into an index, then searched in-process with ``ShardSearcher`` on one
  shard holding the whole index: LUT shortlist (additive decoder) -> QINCo re-rank. The
  LUT-only ranking is reported too ("IVF-QINCo-LUT").
- Faiss ``IndexIVFPQ`` (PQ{M}x8) and ``IndexIVFResidualQuantizer`` (RQ{M}x8, training beam 5,
  norms stored as floats), on the same coarse quantizer and the same code bytes.

Recall@1 / @10 (the true nearest neighbour in the top 1 / 10) and queries/s are measured over a
grid of nprobe and shortlist sizes, Faiss and torch limited to the same thread count. With
``--job`` the same grid runs again through the query job's shard actors (the ``ShardPool`` that
``qinco search`` runs, started once, every setting on the whole query set in one batch): the
"IVF-QINCo-job" points, and the table of the target: for each IVF-RQ point, the best job point at
least as fast and its lead in R@1. One run of the full Ray query job (``run_search``) is measured
separately. Writes
``bench/out/search/results.json``, the Pareto plot ``bench/out/search/pareto.png``, and the
"Search quality" section of ``--results-md`` (default ``bench/RESULTS.md``) with the plot it links
beside it (``bench/search_pareto.png``).

    .venv/bin/python bench/bench_search.py [--datasets dwsift] [--bytes 8 16] [--train-budget 300]

Trained models and indexes are kept under ``--work`` and reused by later runs; ``--model
DATASET:BYTES=URI`` (and ``--index DATASET:BYTES=URI``) take a model trained elsewhere (and its
index): its IVF centroids are then the coarse quantizer of every method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import shlex
import shutil
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402
sys.path.insert(0, str(HERE.parent))

from pipeline.io import results
from pipeline.io import storage  # noqa: E402
from pipeline.config import code_version  # noqa: E402

BEGIN = "<!-- section: search-quality (bench/bench_search.py) -->"
END = "<!-- end section: search-quality -->"
log = logging.getLogger("bench_search")


def update_results_md(path: pathlib.Path, section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving other sections alone."""
    update_section(path, BEGIN, END, section)


def recalls(I_QK: np.ndarray, gt_Q: np.ndarray) -> tuple[float, float]:
    """R@1 and R@10: fraction of queries whose true nearest neighbour is in the top 1 / 10."""
    hit = I_QK[:, :10] == gt_Q[:, None]
    return float(hit[:, :1].any(1).mean()), float(hit.any(1).mean())


def timed(fn, repeats: int = 1, min_total_s: float = 1.0, max_calls: int = 10):
    """Best wall time of at least ``repeats`` calls, more (up to ``max_calls``) while they add up
    to less than ``min_total_s`` (the fast points take ~0.1 s and vary most), and the last result."""
    best, out, total, calls = np.inf, None, 0.0, 0
    while calls < repeats or (total < min_total_s and calls < max_calls):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best, total, calls = min(best, dt), total + dt, calls + 1
    return best, out


def pareto(points: list[dict], x: str = "qps", y: str = "R@1") -> list[dict]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    pts = sorted(points, key=lambda p: (-p[x], -p[y]))
    front, best_y = [], -1.0
    for p in pts:
        if p[y] > best_y:
            front.append(p)
            best_y = p[y]
    return sorted(front, key=lambda p: p[x])


# IVF-QINCo with the decoder of the re-rank in float32 / in bfloat16 (``--rerank-precision``).
QINCO_METHODS = {"float32": "IVF-QINCo", "bfloat16": "IVF-QINCo-bf16"}
# Every IVF-QINCo setting of the grid (the lookup-table ranking alone and re-ranked in float32)
# searched through the query job's shard actors (``--job``).
JOB_METHOD = "IVF-QINCo-job"
DEFAULT_RQ_BEAM = 5  # Faiss's ResidualQuantizer.max_beam_size default


def recall_at_qps(points: list[dict], qps: float, y: str = "R@1") -> float | None:
    """Best recall among points at least as fast as ``qps`` (None if none is)."""
    ok = [p[y] for p in points if p["qps"] >= qps]
    return max(ok) if ok else None


# --------------------------------------------------------------------------- stages
def train_qinco(work: pathlib.Path, xt: np.ndarray, centroids: np.ndarray, M: int, budget_s: float,
                threads: int, epochs: int, lr: float, encode_beam: tuple[int, int] | None = None,
                x_extra: np.ndarray | None = None, device: str = "cpu", batch_size: int = 1024) -> str:
    """Trains on ``xt[2000:]`` (plus ``x_extra``, e.g. base vectors), validates on ``xt[:2000]``.
    A model already in ``work`` (e.g. trained on another machine with ``--stage train``) is reused
    if its IVF centroids are ``centroids``, the coarse quantizer the Faiss baselines use."""
    import torch

    from pipeline.codec.model_file import load_model, save_model
    from pipeline.codec.model import config_from_preset
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_model

    uri = str(work / "model")
    if (work / "model").exists():
        theirs = load_model(uri).centroids_LD.numpy()
        if theirs.shape != centroids.shape or not np.array_equal(theirs, centroids.astype(np.float32)):
            raise SystemExit(f"{uri}: the model's IVF centroids are not the coarse quantizer of this run "
                             f"({work.parent}); train it with this run's centroids file")
        log.info("reusing model %s", uri)
        return uri
    A, B = encode_beam or (None, None)
    qcfg = config_from_preset("cpu", xt.shape[1], M=M, K=256, nlist=len(centroids), A=A, B=B)
    x_train = xt[2000:] if x_extra is None else np.concatenate([xt[2000:], x_extra])
    tcfg = TrainConfig(epochs=epochs, time_budget_s=budget_s, num_threads=threads, val_size=2000,
                       batch_size=batch_size, lr=lr, lr_schedule="time", patience=10, rq_beam=5)
    t = time.perf_counter()
    model, hist = train_model(x_train, xt[:2000], qcfg, tcfg, device=device, centroids=centroids)
    where = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "CPU"
    meta = {"train_config": tcfg.to_dict(), "history": hist, "train_s": time.perf_counter() - t,
            "train_device": where}
    save_model(model, uri, metadata=meta)
    log.info("trained M=%d model in %.0f s (val MSE %.6g)", M, time.perf_counter() - t,
             min(h["val_mse"] for h in hist))
    return uri


def build_index(work: pathlib.Path, model_uri: str, base_uri: str, threads: int,
                lut_weight: float = 0.0) -> tuple[str, dict]:
    from pipeline.stages.encode import EncodeJobConfig, run_encode
    from pipeline.distributed.cluster import cpus_share

    index = str(work / ("index" if not lut_weight else f"index_lw{lut_weight:g}"))
    # The encode job starts a local Ray over this machine's CPUs. Its actors leave room for the read
    # tasks (``qinco encode``'s default): with threads = CPUs and a whole CPU each, no read task
    # could be scheduled and the job would never finish.
    cpus = cpus_share(float(os.cpu_count() or 1), threads)
    rep = run_encode(EncodeJobConfig(model_uri=model_uri, data_uris=[base_uri], index_uri=index,
                                     workers=threads, cpus_per_worker=cpus, shard_rows=32768,
                                     lut_weight=lut_weight))
    return index, rep


def qinco_searcher(index: str, threads: int = 1, precision: str = "float32"):
    """In-process searcher over all shards of ``index``, built as a search job's actor builds it
    (``pipeline.search.scan.build_searcher``: row scales of the lookup-table stage included)."""
    from pipeline.codec.model_file import load_model
    from pipeline.codec.decoder import Decoder
    from pipeline.index.manifest import load_manifest, version_dir
    from pipeline.search.scan import build_searcher
    from pipeline.index.shards import load_shard_rows

    m = load_manifest(index)
    model = load_model(m.model["uri"])
    lists, ids, codes, offsets, scales = load_shard_rows(version_dir(index, m.version), [s.to_dict() for s in m.shards],
                                                     model.config.nlist, model.config.M)
    s = build_searcher(model, lists, ids, codes, offsets, scale_N=scales, source=index, num_threads=threads,
                       decode_fn=Decoder(model, precision))
    return s, model


def rq_method(beam: int) -> str:
    """Method name of Faiss IVF-RQ with encoding beam ``beam`` (Faiss's default, 5: plain IVF-RQ)."""
    return "IVF-RQ" if beam == DEFAULT_RQ_BEAM else f"IVF-RQ-beam{beam}"


def faiss_ivf(kind: str, centroids: np.ndarray, xt: np.ndarray, xb: np.ndarray, M: int,
              rq_beam: int = 5):
    import faiss

    d, nlist = xt.shape[1], len(centroids)
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    if kind == "IVF-PQ":
        if d % M:  # PQ needs M | d: zero-pad vectors and centroids (L2 distances unchanged)
            d_pad = -(-d // M) * M
            quantizer = faiss.IndexFlatL2(d_pad)
            quantizer.add(np.pad(centroids, ((0, 0), (0, d_pad - d))))
            ivf = faiss.IndexIVFPQ(quantizer, d_pad, nlist, M, 8)
            # the Python wrappers keep the quantizer and the inner index alive (referenced_objects)
            index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, d_pad, True), ivf)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, M, 8)
    else:
        index = faiss.IndexIVFResidualQuantizer(quantizer, d, nlist, M, 8, faiss.METRIC_L2,
                                                faiss.AdditiveQuantizer.ST_norm_float)
        index.rq.max_beam_size = rq_beam
    t = time.perf_counter()
    index.train(xt)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    index.add(xb)
    add_s = time.perf_counter() - t
    return index, train_s, add_s


# --------------------------------------------------------------------------- report
def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dataset"], r["bytes"]) for r in results})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4), squeeze=False)
    style = {"IVF-QINCo": "C3o-", JOB_METHOD: "C5*-", "IVF-QINCo-bf16": "C4v-", "IVF-QINCo-LUT": "C1^--",
             "IVF-RQ": "C0s-", "IVF-PQ": "C2d-"}
    for ax, (ds, nb) in zip(axes[0], keys):
        for method in style:
            pts = [r for r in results if (r["dataset"], r["bytes"], r["method"]) == (ds, nb, method)]
            if not pts:
                continue
            front = pareto(pts)
            ax.plot([p["qps"] for p in front], [p["R@1"] for p in front], style[method], label=method, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("queries / s (log)")
        ax.set_ylabel("R@1")
        ax.set_title(f"{ds}, {nb} bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = "| dataset | bytes | method | nprobe | prefix P / kept | shortlist | re-ranked | R@1 | R@10 | queries/s |"
    lines = [head, "|:--|--:|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        reranked = "-" if not r.get("shortlist") else (r.get("rerank") or r["shortlist"])
        prefix = f"{r['prefix_steps']} / {r['prefix_shortlist']}" if r.get("prefix_steps") else "-"
        nprobe = (f"{r['nprobe']}, r {r['probe_ratio']:g} ({r['lists']:.2f} lists)" if r.get("probe_ratio")
                  else r["nprobe"])
        lines.append(f"| {r['dataset']} | {r['bytes']} | {r['method']} | {nprobe} | {prefix} | "
                     f"{r.get('shortlist') or '-'} | {reranked} | {r['R@1']:.3f} | {r['R@10']:.3f} | "
                     f"{r['qps']:,.0f} |")
    return "\n".join(lines)


def summary(results: list[dict]) -> list[str]:
    """Per (dataset, bytes) and IVF-RQ variant: IVF-QINCo's best R@1 at the query rates of the
    IVF-RQ Pareto points."""
    out = []
    for ds, nb in sorted({(r["dataset"], r["bytes"]) for r in results}):
        sel = [r for r in results if (r["dataset"], r["bytes"]) == (ds, nb)]
        # every IVF-QINCo operating point: re-ranked (float32 or bfloat16) or the LUT ranking alone
        qn = [r for r in sel if r["method"] in (*QINCO_METHODS.values(), "IVF-QINCo-LUT")]
        baselines = sorted({r["method"] for r in sel if r["method"].startswith("IVF-RQ")},
                           key=lambda m: (m != "IVF-RQ", m))
        for base in baselines:
            for p in pareto([r for r in sel if r["method"] == base]):
                ours = recall_at_qps(qn, p["qps"])
                gap = ("n/a (no IVF-QINCo point that fast)" if ours is None
                       else f"{100 * (ours - p['R@1']):+.1f} points")
                out.append(f"| {ds} | {nb} | {base} | {p['qps']:,.0f} | {p['R@1']:.3f} | "
                           f"{'-' if ours is None else f'{ours:.3f}'} | {gap} |")
    return out


def render(report: dict) -> str:
    m = report["machine"]
    res = report["results"]
    lines = [
        "## Search quality: IVF-QINCo vs Faiss IVF-PQ / IVF-RQ",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, shared with other jobs (load average at start "
        f"{report['loadavg_start']}, at end {report.get('loadavg_end', '?')}), so speeds are indicative only",
        f"- date: {report['started']}" + ("" if report["complete"] else " (run incomplete: rows so far)"),
        f"- command: `{report['command']}`",
        f"- protocol: {report['queries']} queries, {report['scale']}; IVF{report['nlist']} "
        "coarse quantizer (k-means on learn) shared by all methods; Faiss and torch limited to "
        f"{report['threads']} threads; queries searched in one batch; queries/s = best of "
        f"{report['repeats']} runs (up to 10 while they total under 1 s). IVF-QINCo = QINCo2 `cpu` preset (L=2, de=64, dh=128), "
        f"trained within {report.get('train_budget_text') or training_text(report)}"
        " (AdamW, peak lr "
        f"{report.get('lr', '?')}, cosine over the budget, codebooks initialised from Faiss RQ beam 5), "
        "base encoded by the Ray encode job; "
        "search = additive-decoder LUT shortlist (table scanner, one table per query, "
        + ("each row's additive residual scaled towards its QINCo reconstruction (row scales: 2 bytes per "
           "vector in memory, read from the shards' lut_scale column, which the encode job writes since "
           "shard format 2, or computed by decoding every row of shards without it when the index is "
           "loaded), "
           if report.get("lut_scales") else "")
        + f"{report['threads']} scanner threads) then QINCo re-rank of the whole shortlist, or of its best "
        "R (`--rerank R`; with R < k = 10 the results after R keep the LUT order) "
        "(in-process `ShardSearcher`, one shard). "
        "IVF-QINCo-LUT = the LUT ranking alone; IVF-QINCo-bf16 = the re-rank's decoder network in bfloat16 "
        "(`--rerank-precision bfloat16`). "
        + ("Column prefix P / kept: the LUT shortlist's prefix stage (`--prefix P`; `SearchParams.prefix_steps`): "
           "the probed lists ranked with the tables of the first P codebooks, the best 'kept' ranked with all "
           "of them. " if any(r.get("prefix_steps") for r in res) else "")
        + ("Column nprobe 'P, r R (L lists)': adaptive nprobe (`--probe-ratio R`; `SearchParams.probe_ratio`): of "
           "the P nearest lists, those within R times the nearest one's squared distance, L per query on "
           "average. " if any(r.get("probe_ratio") for r in res) else "")
        + "Faiss IVF-RQ: training and encoding beam 5 (Faiss's default; "
        "IVF-RQ-beamB: beam B), ST_norm_float; Faiss codecs trained on the same set as IVF-QINCo "
        "(learn+base: all of learn and base).",
        "",
    ]
    for key, info in report.get("models", {}).items():
        lines.append(f"- {key}: {info}")
    if report.get("ray_job"):
        lines += ["", "Full Ray query job (`run_search`, shard actors, 1 CPU each):", ""]
        for rj in report["ray_job"]:
            lines.append(f"- {rj['dataset']} {rj['bytes']} B: nprobe {rj['nprobe']}, "
                         + (f"prefix stage {rj['prefix_steps']} / {rj['prefix_shortlist']}, " if rj.get("prefix_steps") else "")
                         + f"shortlist {rj['shortlist']}, "
                         f"{rj.get('precision', 'float32')} re-rank, "
                         f"{rj['workers']} actors, {rj['shards']} shards: R@1 {rj['R@1']:.3f}, R@10 {rj['R@10']:.3f}, "
                         f"{rj['queries_per_s']:,.0f} queries/s (load {rj['load_s']:.1f} s, stages "
                         + ", ".join(f"{k} {v:.2f}" for k, v in rj["stages"].items() if k != "load_s") + ")")
    lines += ["", "R@1 at equal speed (best IVF-QINCo point: the LUT ranking alone or re-ranked in float32 or bfloat16; at least as fast as"
              " each IVF-RQ Pareto point):", "",
              "| dataset | bytes | baseline | baseline queries/s | baseline R@1 | IVF-QINCo R@1 | difference |",
              "|:--|--:|:--|--:|--:|--:|:--|"]
    lines += summary(res)
    target = target_table(res)
    if target:
        lines += ["", "The target through the query job (`--job`: IVF-QINCo-job = every IVF-QINCo setting of the grid "
                  "through the query job's shard actors, the whole query set in one batch): for each IVF-RQ point, "
                  "the best job point at least as fast, met where its R@1 is 5 points above:", ""] + target
    lines += ["", "![Pareto curves](search_pareto.png)", "", "<details><summary>all measured points</summary>",
              "", table(res), "", "</details>"]
    if report.get("notes"):
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines)


def training_text(report: dict) -> str:
    """IVF-QINCo's training budget and set, and encoder beam, of one run."""
    A, B = report.get("encode_beam") or (8, 4)
    lw = report.get("lut_weight") or 0.0
    dev, bs = report.get("train_device", "cpu"), report.get("batch_size", 1024)
    how = f" ({dev}, batch {bs})" if (dev, bs) != ("cpu", 1024) else ""
    return (f"{report['train_budget_s']:.0f} s on {report.get('train_set', 'learn')}{how}, "
            f"encoded with A={A}, B={B}" + (f", lookup-table weight {lw:g}" if lw else ""))


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs. Runs of different datasets or code sizes (e.g. one
    ``--work`` each) are put side by side; repeated runs of the same command are combined point by
    point, keeping each point's best queries/s over the runs (for every method alike: it damps the
    slow-downs a shared machine causes). Recall does not depend on timing, so runs that disagree on
    a point's recall are an error."""
    if len({bool(r.get("lut_scales")) for r in reports}) > 1:
        raise ValueError("the runs differ in the lookup-table stage (row scales in some only)")
    weights: dict[tuple, float] = {}
    for r in reports:
        for key in {(x["dataset"], x["bytes"]) for x in r.get("results", [])}:
            if weights.setdefault(key, r.get("lut_weight") or 0.0) != (r.get("lut_weight") or 0.0):
                raise ValueError(f"the runs of {key} encode with different lookup-table weights")
    out = dict(reports[0])
    points: dict[tuple, dict] = {}
    for r in reports:
        for x in r.get("results", []):
            key = (x["dataset"], x["bytes"], x["method"], x["nprobe"], x.get("shortlist"), x.get("rerank"),
                   x.get("prefix_steps"), x.get("prefix_shortlist"), x.get("probe_ratio"))
            if key not in points:
                points[key] = dict(x)
                continue
            p = points[key]
            if (p["R@1"], p["R@10"]) != (x["R@1"], x["R@10"]):
                raise ValueError(f"runs disagree on the recall of {key}: {p['R@1']}/{p['R@10']} "
                                 f"against {x['R@1']}/{x['R@10']}")
            p["qps"] = max(p["qps"], x["qps"])
    out["results"] = list(points.values())
    out["ray_job"] = [x for r in reports for x in r.get("ray_job", [])]
    out["models"] = {k: v for r in reports for k, v in r.get("models", {}).items()}
    commands = [r["command"] for r in reports]
    out["command"] = " ; ".join(c if commands.count(c) == 1 else f"{c} (best of {commands.count(c)} runs)"
                                for c in dict.fromkeys(commands))
    out["complete"] = all(r["complete"] for r in reports)
    out["loadavg_end"] = reports[-1].get("loadavg_end")
    budgets = {}
    for r in reports:
        for key in sorted({(x["dataset"], x["bytes"]) for x in r.get("results", [])}):
            budgets.setdefault(key, training_text(r))
    out["train_budget_text"] = "; ".join(f"{t} ({ds} {nb} B)" for (ds, nb), t in budgets.items())
    return out


def job_grid(a, index_uri: str, xq: np.ndarray, gt: np.ndarray, settings: list[tuple], add) -> None:
    """The in-process grid's IVF-QINCo settings (float32 re-rank, and the lookup-table ranking
    alone) through the query job's shard actors: one ``ShardPool`` (``qinco search``'s, ``a.threads``
    actors of 1 CPU) over the index, every setting searching the whole query set in one batch."""
    import ray

    from pipeline.distributed.shard_pool import ShardPool
    from pipeline.search.params import SearchParams

    ray.init(address="local", num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    pool = ShardPool(index_uri, None, a.threads, 1.0)
    try:
        pool.search_batch(xq[:100], SearchParams(k=10, nprobe=1, shortlist=10, rerank=2))  # warm-up
        log.info("job: %d actors ready in %.1f s", a.threads, time.perf_counter() - t)
        for p, P, r in settings:
            def prefix(S):
                return {"prefix_steps": P, "prefix_shortlist": a.prefix_factor * S} if P else {}

            grid = [(10, 0)] + [(S, None) for S in a.shortlist] + [(10, R) for R in a.rerank]
            for S, R in grid:
                params = SearchParams(k=10, nprobe=p, shortlist=S, rerank=R, probe_ratio=r or None, **prefix(S))
                dt, (_, I) = timed(lambda: pool.search_batch(xq, params), a.repeats)
                r1, r10 = recalls(I, gt)
                add({"method": JOB_METHOD, "nprobe": p, "shortlist": None if R == 0 else S, "rerank": R or None,
                     "R@1": r1, "R@10": r10, "qps": len(xq) / dt, **prefix(S),
                     **({"probe_ratio": r} if r else {})})
    finally:
        pool.close()
        ray.shutdown()


def parse_given(specs: list[str]) -> dict[tuple[str, int], str]:
    """``DATASET:BYTES=URI`` arguments -> {(dataset, bytes): uri}."""
    out = {}
    for spec in specs:
        key, sep, uri = spec.partition("=")
        name, sep2, nb = key.partition(":")
        if not (sep and sep2 and nb.isdigit() and uri):
            raise SystemExit(f"expected DATASET:BYTES=URI, got {spec!r}")
        out[(name, int(nb))] = uri
    return out


def target_rows(results: list[dict], lead: float = 0.05) -> list[dict]:
    """For each IVF-RQ point (every nprobe), the best IVF-QINCo-job point at least as fast: the
    target is met where its R@1 is ``lead`` (5 points) or more above; an IVF-RQ point faster than
    every job point is missed."""
    out = []
    for ds, nb in sorted({(r["dataset"], r["bytes"]) for r in results}):
        sel = [r for r in results if (r["dataset"], r["bytes"]) == (ds, nb)]
        job = [r for r in sel if r["method"] == JOB_METHOD]
        if not job:
            continue
        for p in sorted((r for r in sel if r["method"] == "IVF-RQ"), key=lambda r: r["nprobe"]):
            fast = [r for r in job if r["qps"] >= p["qps"]]
            best = max(fast, key=lambda r: (r["R@1"], r["qps"])) if fast else None
            out.append({"dataset": ds, "bytes": nb, "nprobe": p["nprobe"], "rq_qps": p["qps"], "rq_R@1": p["R@1"],
                        "job": best, "lead": None if best is None else best["R@1"] - p["R@1"],
                        "met": best is not None and best["R@1"] - p["R@1"] >= lead - 1e-12})
    return out


def target_table(results: list[dict]) -> list[str]:
    rows = target_rows(results)
    if not rows:
        return []
    lines = ["| dataset | bytes | IVF-RQ nprobe | IVF-RQ queries/s | IVF-RQ R@1 | job setting (nprobe / shortlist / "
             "re-ranked) | job queries/s | job R@1 | lead | met |", "|:--|--:|--:|--:|--:|:--|--:|--:|--:|:--|"]
    for r in rows:
        j = r["job"]
        setting = "-" if j is None else (f"{j['nprobe']} / {j.get('shortlist') or '-'} / "
                                         f"{'-' if not j.get('shortlist') else (j.get('rerank') or j['shortlist'])}")
        lines.append(f"| {r['dataset']} | {r['bytes']} | {r['nprobe']} | {r['rq_qps']:,.0f} | {r['rq_R@1']:.3f} | "
                     f"{setting} | {'-' if j is None else format(j['qps'], ',.0f')} | "
                     f"{'-' if j is None else format(j['R@1'], '.3f')} | "
                     f"{'no job point this fast' if j is None else format(100 * r['lead'], '+.1f')} | "
                     f"{'yes' if r['met'] else 'no'} |")
    met = sum(r["met"] for r in rows)
    lines += ["", f"Target met at {met} of {len(rows)} IVF-RQ points."]
    return lines


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["dwsift"])
    ap.add_argument("--bytes", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-learn", type=int, default=None, help="use only the first N learn vectors")
    ap.add_argument("--max-base", type=int, default=None,
                    help="use only the first N base vectors (ground truth recomputed; for quick checks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--rq-nprobe", type=int, nargs="+", default=None,
                    help="nprobe of the Faiss baselines (default: --nprobe)")
    ap.add_argument("--job", action="store_true",
                    help="run the IVF-QINCo grid through the query job's shard actors too")
    ap.add_argument("--model", action="append", default=[], metavar="DATASET:BYTES=URI",
                    help="a trained model to search instead of training one (its centroids are the coarse quantizer)")
    ap.add_argument("--index", action="append", default=[], metavar="DATASET:BYTES=URI",
                    help="an index of --model's model over the dataset's base, instead of encoding one")
    ap.add_argument("--shortlist", type=int, nargs="+", default=[20, 50, 100, 200, 400])
    ap.add_argument("--rerank", type=int, nargs="*", default=[2, 3, 5],
                    help="extra IVF-QINCo points: shortlist 10 (= k) with only the best R re-ranked")
    ap.add_argument("--prefix", type=int, nargs="+", default=[0], metavar="P",
                    help="IVF-QINCo lookup-table prefix stage(s) to measure: rank the probed lists with the first P"
                         " codebooks' tables, keep --prefix-factor x shortlist, rank those with all tables (0: off)")
    ap.add_argument("--probe-ratio", type=float, nargs="+", default=[0.0], metavar="R",
                    help="IVF-QINCo adaptive nprobe(s) to measure (SearchParams.probe_ratio): of the nprobe nearest"
                         " lists visit those within R times the nearest one's squared distance (0: all; applied to"
                         " every nprobe above 1)")
    ap.add_argument("--prefix-factor", type=int, default=4,
                    help="prefix stage: candidates kept per query, as a multiple of the shortlist (default 4)")
    ap.add_argument("--train-set", choices=["learn", "learn+base"], default="learn",
                    help="vectors the codecs (IVF-PQ, IVF-RQ, IVF-QINCo) are trained on; the coarse"
                         " quantizer always uses learn. learn+base trains on the data being indexed,"
                         " as a production index does")
    ap.add_argument("--encode-beam", type=int, nargs=2, metavar=("A", "B"), default=None,
                    help="IVF-QINCo encoder pre-selection A and beam B (default: the preset's 8 4)")
    ap.add_argument("--lut-weight", type=float, default=0.0,
                    help="IVF-QINCo index built with the encode job's lut_weight (codes chosen among the final"
                         " beam by neural + this weight x lookup-table error; its own index directory)")
    ap.add_argument("--rq-beam", type=int, nargs="+", default=[DEFAULT_RQ_BEAM],
                    help="Faiss IVF-RQ training and encoding beam(s); each beam but Faiss's default"
                         " (5) is reported as method IVF-RQ-beamB")
    ap.add_argument("--train-budget", type=float, default=300.0, help="QINCo training seconds per model")
    ap.add_argument("--train-device", default="cpu",
                    help="torch device the IVF-QINCo models are trained on (e.g. cuda; search runs on CPU)")
    ap.add_argument("--batch-size", type=int, default=1024, help="IVF-QINCo training batch size")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (cosine over the budget)")
    ap.add_argument("--stage", choices=["all", "train"], default="all",
                    help="train: only train the IVF-QINCo models into --work (a later run reuses"
                         " them), e.g. to train beside another job")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray-nprobe", type=int, default=16)
    ap.add_argument("--ray-shortlist", type=int, default=100)
    ap.add_argument("--ray-prefix", type=int, nargs="+", default=[0], metavar="P",
                    help="prefix stage(s) of the Ray query job runs (one run each; 0: off)")
    ap.add_argument("--rerank-precision", nargs="+", choices=list(QINCO_METHODS), default=list(QINCO_METHODS),
                    help="arithmetic(s) of the re-rank's decoder network to measure")
    ap.add_argument("--ray-precision", choices=list(QINCO_METHODS), default="float32")
    ap.add_argument("--work", default=str(HERE / "out" / "search"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--render-only", nargs="+", metavar="RESULTS_JSON", default=None,
                    help="only rewrite the RESULTS.md section (and the plot) from these results.json"
                         " files of earlier runs, merged")
    ap.add_argument("--note", action="append", default=[], help="with --render-only: a finding to list")
    a = ap.parse_args(argv)
    given_models, given_indexes = parse_given(a.model), parse_given(a.index)
    if a.render_only:
        report = merge_reports([json.loads(pathlib.Path(f).read_text()) for f in a.render_only])
        report["notes"] = report.get("notes", []) + a.note
        plot(report["results"], pathlib.Path(a.results_md).parent / "search_pareto.png")
        update_results_md(pathlib.Path(a.results_md), render(report))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import faiss
    import torch

    from pipeline.io import vectors
    from pipeline.sysinfo import machine_info
    from pipeline.stages.datasets import resolve_dataset
    from pipeline.codec.decoder import Decoder
    from pipeline.search.params import SearchParams
    from pipeline.search.probe import prune_lists
    from pipeline.codec.ivf import IVFConfig, train_coarse_quantizer
    from pipeline.codec.model_file import load_model

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_search.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    report = {"command": command.strip(), "machine": machine_info(), "code_version": code_version(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "loadavg_start": " ".join(f"{v:.1f}" for v in os.getloadavg()), "threads": a.threads,
              "queries": a.queries, "nlist": a.nlist, "repeats": a.repeats, "train_budget_s": a.train_budget,
              "lr": a.lr, "batch_size": a.batch_size, "train_device": a.train_device, "train_set": a.train_set,
              "encode_beam": a.encode_beam, "lut_scales": True, "lut_weight": a.lut_weight,
              "results": [], "models": {}, "ray_job": [], "complete": False}
    res = report["results"]
    report["scale"] = ("full base, ground truth from the dataset" if a.max_base is None else
                       f"first {a.max_base:,} base vectors (exact ground truth recomputed)") + \
        ("" if a.max_learn is None else f", first {a.max_learn:,} learn vectors for all training")

    def save() -> None:
        report["loadavg_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
        storage.write_bytes_atomic(str(work / "results.json"), json.dumps(report, indent=2, default=float).encode())
        if res:
            plot(res, work / "pareto.png")
            shutil.copyfile(work / "pareto.png", pathlib.Path(a.results_md).parent / "search_pareto.png")
        update_results_md(pathlib.Path(a.results_md), render(report))

    def add(row: dict) -> None:
        res.append(row)
        print(table([row]).splitlines()[-1], flush=True)

    for name in a.datasets:
        ds = resolve_dataset(name, a.data_dir)
        xt = vectors.read_vectors(ds.learn, max_rows=a.max_learn).astype(np.float32)
        xb = vectors.read_vectors(ds.base, max_rows=a.max_base).astype(np.float32)
        xq = vectors.read_vectors(ds.query, max_rows=a.queries).astype(np.float32)
        base_uri = ds.base
        if a.max_base is None:
            gt = vectors.read_vectors(ds.groundtruth, max_rows=a.queries)[:, 0].astype(np.int64)
        else:
            from pipeline.search.evaluation import knn_ground_truth

            gt = knn_ground_truth(xq, xb, k=1)[1][:, 0]
            base_uri = str(work / f"{name}_base{a.max_base}.fvecs")
            vectors.write_vectors(base_uri, xb)
        for nb in a.bytes:
            M = nb  # K = 256: one byte per code
            wdir = work / f"{name}_{nb}B"
            wdir.mkdir(exist_ok=True)
            given_model = given_models.get((name, nb))
            if given_model is not None:  # its coarse quantizer is every method's
                centroids = load_model(given_model).centroids_LD.numpy()
            else:
                cpath = work / f"{name}_ivf{a.nlist}_learn{len(xt)}.npy"
                if cpath.exists():
                    centroids = np.load(cpath)
                else:
                    centroids = train_coarse_quantizer(xt, IVFConfig(nlist=a.nlist), progress=False)
                    np.save(cpath, centroids)
            # -- Faiss baselines on the same coarse quantizer
            kinds = [("IVF-PQ", DEFAULT_RQ_BEAM)] + [("IVF-RQ", b) for b in a.rq_beam]
            for kind, beam in (kinds if a.stage == "all" else ()):
                xtrain = xt if a.train_set == "learn" else np.concatenate([xt, xb])
                index, train_s, add_s = faiss_ivf(kind, centroids, xtrain, xb, M, beam)
                del xtrain
                kind = rq_method(beam) if kind == "IVF-RQ" else kind
                report["models"][f"{name} {nb} B {kind}"] = f"train {train_s:.0f} s, add {add_s:.0f} s"
                for p in a.rq_nprobe or a.nprobe:
                    faiss.ParameterSpace().set_index_parameter(index, "nprobe", p)
                    dt, (_, I) = timed(lambda: index.search(xq, 10), a.repeats)
                    r1, r10 = recalls(I, gt)
                    add({"dataset": name, "bytes": nb, "method": kind, "nprobe": p, "shortlist": None,
                         "R@1": r1, "R@10": r10, "qps": len(xq) / dt})
                del index
                save()
            # -- IVF-QINCo
            t = time.perf_counter()
            model_uri = given_model or train_qinco(wdir, xt, centroids, M, a.train_budget, a.threads, a.epochs,
                                                   a.lr, a.encode_beam, xb if a.train_set == "learn+base" else None,
                                                   a.train_device, a.batch_size)
            if a.stage == "train":
                continue
            import ray

            from pipeline.codec.model_file import read_model_info

            info = read_model_info(model_uri)
            # An index already built returns before Ray starts; otherwise the encode job starts Ray,
            # which is shut down so that the in-process search, like Faiss, is timed without Ray's
            # daemons beside it (they cost it ~20% on 2 cores).
            if (name, nb) in given_indexes:
                index_uri, enc = given_indexes[(name, nb)], {"status": "given"}
            else:
                index_uri, enc = build_index(wdir, model_uri, base_uri, a.threads, a.lut_weight)
            if ray.is_initialized():
                ray.shutdown()
            hist = info.get("metadata", {}).get("history", [])
            best = min((h["val_mse"] for h in hist), default=float("nan"))
            built = ("index built by the Ray encode job in an earlier run" if enc.get("status") in ("up-to-date", "given")
                     else f"encode job {enc.get('vectors_per_s') or 0:,.0f} vectors/s ({enc.get('status')}); "
                          f"model+index {time.perf_counter() - t:.0f} s this run")
            where = info.get("metadata", {}).get("train_device")
            report["models"][f"{name} {nb} B IVF-QINCo"] = (
                f"val MSE {best:,.0f}" if best >= 100 else f"val MSE {best:.4g}") + (
                f" after {max((h.get('epoch', 0) for h in hist), default='?')} epochs"
                + (f" on {where}" if where else "") + f"; {built}")
            torch.set_num_threads(a.threads)
            searcher, model = qinco_searcher(index_uri, a.threads)
            # compiles (or loads from the cache) the scan's kernels outside the timed calls
            searcher.search(xq[:100], SearchParams(k=10, nprobe=1, shortlist=10, rerank=2))
            decoders = {prec: Decoder(model, prec) for prec in a.rerank_precision}
            settings = [(p, P, r) for p in a.nprobe for P in a.prefix for r in a.probe_ratio if p > 1 or not r]
            for p, P, r in settings:
                def prefix(S):
                    return {"prefix_steps": P, "prefix_shortlist": a.prefix_factor * S} if P else {}

                probing = {}
                if r:  # lists visited per query, for the report
                    lists = prune_lists(xq, searcher.probe(xq, p)[1], searcher.centroids_LD, r)
                    probing = {"probe_ratio": r, "lists": float((lists >= 0).sum(1).mean())}
                params = SearchParams(k=10, nprobe=p, shortlist=10, probe_ratio=r or None, **prefix(10))
                s_lut = searcher.decode_fn
                searcher.decode_fn = None
                dt, (_, I) = timed(lambda: searcher.search(xq, params), a.repeats)
                searcher.decode_fn = s_lut
                r1, r10 = recalls(I, gt)
                add({"dataset": name, "bytes": nb, "method": "IVF-QINCo-LUT", "nprobe": p, "shortlist": None,
                     "R@1": r1, "R@10": r10, "qps": len(xq) / dt, **prefix(10), **probing})
                for prec in a.rerank_precision:
                    searcher.decode_fn = decoders[prec]
                    grid = [(S, None) for S in a.shortlist] + [(10, R) for R in a.rerank]
                    for S, R in grid:
                        params = SearchParams(k=10, nprobe=p, shortlist=S, rerank=R, probe_ratio=r or None,
                                              **prefix(S))
                        dt, (_, I) = timed(lambda: searcher.search(xq, params), a.repeats)
                        r1, r10 = recalls(I, gt)
                        add({"dataset": name, "bytes": nb, "method": QINCO_METHODS[prec], "nprobe": p,
                             "shortlist": S, "rerank": R, "R@1": r1, "R@10": r10, "qps": len(xq) / dt,
                             **prefix(S), **probing})
                save()
            del searcher
            if a.job:
                job_grid(a, index_uri, xq, gt, settings, lambda row: add({"dataset": name, "bytes": nb, **row}))
                save()
            # -- one run of the full Ray query job
            from pipeline.stages.search import SearchJobConfig, run_search

            qpath = work / f"{name}_query{a.queries}.fvecs"
            if not qpath.exists():
                vectors.write_vectors(str(qpath), xq)
            out = str(wdir / "ray_results.bin")
            ray.init(address="local", num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
            for P in a.ray_prefix:
                S1 = a.prefix_factor * a.ray_shortlist if P else None
                params = SearchParams(k=10, nprobe=a.ray_nprobe, shortlist=a.ray_shortlist, prefix_steps=P,
                                      prefix_shortlist=S1)
                rep = run_search(SearchJobConfig(index_uri=index_uri, queries_uri=str(qpath), out_uri=out, params=params,
                                                 workers=a.threads, cpus_per_worker=1.0, query_batch=len(xq),
                                                 rerank_precision=a.ray_precision))
                I, _ = results.read_knn_results(out)
                r1, r10 = recalls(I, gt)
                report["ray_job"].append({"dataset": name, "bytes": nb, "nprobe": a.ray_nprobe,
                                          "precision": a.ray_precision, "prefix_steps": P, "prefix_shortlist": S1,
                                          "shortlist": a.ray_shortlist, "workers": a.threads,
                                          "shards": rep["shards"], "R@1": r1, "R@10": r10,
                                          "queries_per_s": rep["queries_per_s"], "load_s": rep["stages"]["load_s"],
                                          "stages": rep["stages"]})
            ray.shutdown()
            save()
    if a.stage == "train":
        return 0
    report["complete"] = True
    save()
    print(table(res))
    print("\n".join(summary(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
