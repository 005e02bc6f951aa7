"""QINCo codec against Faiss PQ / RQ / LSQ on the real datasets, at 8 and 16 bytes.

For each dataset and code size: train a QINCo model on the learn set (minus a validation
split) within a wall-time budget, encode and decode the full base, measure MSE and R@1/10/100
(exhaustive search of the queries over the decoded base, shipped ground truth), encode and
decode throughput, the speed / MSE of pre-selection + beam settings against the full greedy
search (``A=0, B=1``) on a base subset, then run the Faiss baselines in the same process on
the same data. Writes ``bench/out/codec.json`` and the "QINCo codec" section of
``bench/RESULTS.md`` after every row, so an interrupted run keeps its figures.

    .venv/bin/python bench/bench_codec.py [--datasets dwsift] [--bytes 8 16] [--time-budget 720]
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs spinning
# threads steal the cores the working threads need (this must precede the torch import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.io import storage  # noqa: E402
from pipeline.stages.baselines import format_table, load_inputs, run_baselines  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402
from pipeline.config import code_version  # noqa: E402
from pipeline.stages.datasets import DATASETS, resolve_dataset  # noqa: E402
from pipeline.codec.decoder import decode  # noqa: E402
from pipeline.codec.encoder import encode  # noqa: E402
from pipeline.search.evaluation import recall_at, search_decoded  # noqa: E402
from pipeline.codec.decoder import reconstruction_mse  # noqa: E402
from pipeline.codec.model import QINCo, QincoConfig, config_from_preset  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.loop import train_model  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402
BEGIN = "<!-- section: qinco-codec (bench/bench_codec.py) -->"
END = "<!-- end section: qinco-codec -->"
log = logging.getLogger("bench_codec")
COLUMNS = ("dataset", "method", "bytes", "mse", "mse_vs_LSQ", "R@1", "R@10", "R@100",
           "train_s", "encode_vps", "encode_vps_per_cpu_s", "decode_vps")
# LSQ figures measured with the same protocol (Faiss LSQ trained on the full learn set): dwsift
# from the dataset README, glove50 8 bytes from bench/bench_baselines.py (RESULTS.md); used only
# with --lsq-reference when LSQ cannot be rerun within the time available.
LSQ_REFERENCE = {
    ("dwsift", 8): {"mse": 19434.0, "R@1": 0.360, "R@10": 0.829, "R@100": 0.991},
    ("dwsift", 16): {"mse": 11118.0, "R@1": 0.523, "R@10": 0.953, "R@100": 0.999},
    ("glove50", 8): {"mse": 3.27877, "R@1": 0.285, "R@10": 0.668, "R@100": 0.938},
}
SPEED_COLUMNS = ("dataset", "bytes", "A", "B", "mse", "mse_vs_A0B1", "encode_vps",
                 "vps_per_cpu_s", "speedup", "macs_per_vector")


def candidate_macs(cfg: QincoConfig, A: int, B: int) -> int:
    """Multiply-adds per vector of the candidate evaluations of one encoding:
    ``(M - plain) · B · A' · (2·L·de·dh + de²)`` network work plus, per beam entry, the
    residual dot products with codebook and pre-selector (``2·K·D``) and the context
    (``2·D·de``); a plain first step costs ``K·D``."""
    E = cfg.de if cfg.variant == "qinco2" else cfg.dim
    H = cfg.dh if cfg.variant == "qinco2" else cfg.h
    Ae = A if 0 < A < cfg.K else cfg.K
    per_cand = 2 * cfg.L * E * H + (E * E if cfg.variant == "qinco2" else E)
    presel = 2 if 0 < A < cfg.K else 1
    plain = 0 if cfg.nlist else 1
    per_entry = presel * cfg.K * cfg.dim + 2 * cfg.dim * E
    return plain * cfg.K * cfg.dim + (cfg.M - plain) * B * (Ae * per_cand + per_entry)


def timed(fn):
    """``(result, wall seconds, process CPU seconds)`` of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run_qinco(name: str, nbytes: int, data, a) -> tuple[dict, list[dict], QINCo]:
    xt, xb, xq, gt = data
    log.info("%s %d bytes: training for %.0f s", name, nbytes, a.time_budget)
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    d = xt.shape[1]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(xt))
    x_val, x_train = xt[perm[:a.val_size]], xt[perm[a.val_size:]]
    qcfg = config_from_preset(a.preset, d, M=nbytes, K=256)
    # the cosine decay follows the wall-time budget, so it ends when the budget does
    tcfg = TrainConfig(epochs=a.max_epochs, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup,
                       time_budget_s=a.time_budget, patience=a.patience, val_size=a.val_size,
                       lr_schedule="time", rq_beam=a.rq_beam)
    (model, history), train_s, _ = timed(lambda: train_model(x_train, x_val, qcfg, tcfg))
    model.eval()
    log.info("trained in %.0f s, best epoch val MSE %.6g", train_s, min(h["val_mse"] for h in history))
    enc_A = a.encode_A if a.encode_A is not None else qcfg.A
    enc_B = a.encode_B if a.encode_B is not None else qcfg.B
    (codes, _), enc_s, enc_c = timed(lambda: encode(model, xb, A=enc_A, B=enc_B, progress=True,
                                                    source=name + " base"))
    xhat, dec_s, _ = timed(lambda: decode(model, codes))
    _, I = search_decoded(xq, xhat, 100)
    row = {"dataset": name, "method": "QINCo2", "factory": f"{a.preset} M={nbytes} K=256",
           "bytes": nbytes, "mse": reconstruction_mse(xb, xhat), **recall_at(I, gt, (1, 10, 100)),
           "train_s": train_s, "encode_vps": len(xb) / enc_s, "encode_vps_per_cpu_s": len(xb) / enc_c,
           "decode_vps": len(xb) / dec_s, "A": enc_A, "B": enc_B,
           "epochs_run": sum(1 for h in history if h.get("epoch", 0) > 0),
           "time_budget_s": a.time_budget,
           "train_samples_per_s": float(np.nanmean([h.get("samples_per_s", np.nan) for h in history[1:]]))
           if len(history) > 1 else math.nan,
           "val_mse_rq_init": history[0]["val_mse"], "val_mse_best": min(h["val_mse"] for h in history),
           "n_train": len(x_train), "n_base": len(xb), "n_query": len(xq),
           "model_config": qcfg.to_dict(), "train_config": tcfg.to_dict(),
           "macs_per_vector": candidate_macs(qcfg, qcfg.A, qcfg.B)}
    log.info("QINCo2 %s %d bytes: mse %.6g R@1 %.4f", name, nbytes, row["mse"], row["R@1"])
    # pre-selection + beam against the full greedy search, on a base subset
    xs = xb[:a.speed_rows]
    speed = []
    for A, B in [(0, 1)] + [(16, b) for b in a.speed_beams] + [(qcfg.A, qcfg.B), (enc_A, enc_B)]:
        if any(s["A"] == A and s["B"] == B for s in speed):
            continue
        (c, _), w, cpu = timed(lambda: encode(model, xs, A=A, B=B))
        speed.append({"dataset": name, "bytes": nbytes, "A": A, "B": B,
                      "mse": reconstruction_mse(xs, decode(model, c)),
                      "encode_vps": len(xs) / w, "vps_per_cpu_s": len(xs) / cpu,
                      "macs_per_vector": candidate_macs(qcfg, A, B), "rows": len(xs)})
        log.info("A=%d B=%d: %.0f vectors/s", A, B, len(xs) / w)
    ref = speed[0]
    for s in speed:
        s["mse_vs_A0B1"] = s["mse"] / ref["mse"]
        s["speedup"] = s["vps_per_cpu_s"] / ref["vps_per_cpu_s"]
        s["speedup_wall"] = s["encode_vps"] / ref["encode_vps"]
    return row, speed, model


def _fmt(key, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key == "mse":
        return f"{v:,.6g}" if abs(v) < 100 else f"{v:,.0f}"
    if key.startswith("R@"):
        return f"{v:.3f}"
    if key in ("mse_vs_LSQ", "mse_vs_A0B1", "speedup"):
        return f"{v:.3f}"
    if key in ("train_s",):
        return f"{v:.0f}"
    if key in ("encode_vps", "decode_vps", "vps_per_cpu_s", "macs_per_vector", "encode_vps_per_cpu_s"):
        return f"{v:,.0f}"
    return str(v)


def table(rows: list[dict], columns) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    rows = [dict(r, method=r["method"] + " (reference)") if r.get("reference_only") else r for r in rows]
    cells = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[j]) for x in cells]) for j, c in enumerate(cols)]
    num = [c not in ("dataset", "method") for c in cols]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, num)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, num)) + "|"
    return "\n".join([line(cols), sep] + [line(x) for x in cells])


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        lsq = [x for x in rows if x["dataset"] == r["dataset"] and x["bytes"] == r["bytes"]
               and x["method"] == "LSQ"]
        r["mse_vs_LSQ"] = r["mse"] / lsq[0]["mse"] if lsq else None


def _describe_training(report: dict) -> str:
    """One phrase per distinct (architecture, training recipe) among the QINCo rows."""
    out = []
    for r in report["rows"]:
        if "model_config" not in r:
            continue
        q, t = r["model_config"], r["train_config"]
        d = (f"L={q['L']}, de={q['de']}, dh={q['dh']}, A={q['A']}, B={q['B']}, B_train={q['B_train']};"
             f" AdamW lr {t['lr']:g} (weight decay {t['weight_decay']:g}), batch {t['batch_size']},"
             f" codebooks initialised from Faiss RQ with beam {t.get('rq_beam', 0)}"
             f" ({'greedy k-means' if not t.get('rq_beam') else 'as the RQ baseline'})")
        if d not in out:
            out.append(d)
    return "; ".join(out) or "-"


def _budgets(report: dict) -> str:
    """Training budget per dataset, e.g. "1800 s (dwsift), 600 s (glove50)"."""
    seen = {}
    for r in report["rows"]:
        if "time_budget_s" in r:
            seen.setdefault(r["dataset"], r["time_budget_s"])
    return ", ".join(f"{b:.0f} s ({d})" for d, b in seen.items()) or f"{report['args']['time_budget']:.0f} s"


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs (e.g. one process per model run side by side)."""
    if len(reports) == 1:
        return reports[0]
    out = dict(reports[0])
    out["rows"] = [r for rep in reports for r in rep["rows"]]
    out["speed"] = [s for rep in reports for s in rep["speed"]]
    out["command"] = " ; ".join(rep["command"] for rep in reports)
    out["complete"] = all(rep["complete"] for rep in reports)
    out["started"] = min(rep["started"] for rep in reports)
    out["load_end"] = reports[-1].get("load_end", "-")
    out["notes"] = [n for rep in reports for n in rep.get("notes", [])]
    add_ratios(out["rows"])
    return out


def render(report: dict) -> str:
    m = report["machine"]
    rows, speed = report["rows"], report["speed"]
    enc = sorted({(r["A"], r["B"]) for r in rows if "model_config" in r})
    lines = [
        "## QINCo codec vs Faiss (bench/bench_codec.py)",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['platform']}), shared with other"
        f" jobs: load average {report['load_start']} at start, {report.get('load_end', '-')} at"
        " the end, so throughputs are indicative (`vps_per_cpu_s` = vectors per CPU-second of"
        " this process, steadier under load)",
        f"- date: {report['started']}" + ("" if report["complete"] else " (run incomplete: rows so far)"),
        f"- command: `{report['command']}`",
        f"- QINCo2: preset `{report['args']['preset']}` ({_describe_training(report)}),"
        f" trained on learn minus {report['args']['val_size']} validation vectors with a wall-time"
        f" budget per model of {_budgets(report)}, initialisation included (CPU, torch"
        f" {report['torch_threads']} threads; the papers train for hours on GPUs); full base"
        f" encoded with {', '.join(f'A={A}, B={B}' for A, B in enc) or '-'};"
        " Faiss baselines (1 OpenMP thread) on the same data in the same"
        f" process: {', '.join(report['args']['baselines'])} (RQ beam 5); exhaustive search of all"
        " queries over the decoded base. Rows marked `(reference)` are Faiss LSQ figures measured"
        " earlier with the same protocol (dwsift: the dataset README; glove50: the Faiss baselines"
        " section), not rerun here; `mse_vs_LSQ` divides by the LSQ row of the same size.",
        "",
        table(rows, COLUMNS),
        "",
        "Pre-selection and beam against the full greedy search (A=0: all 256 codewords through the"
        f" network, B=1), same model, first {speed[0]['rows'] if speed else '-'} base vectors;"
        " speedup in CPU time (`macs_per_vector` = multiply-adds of the candidate evaluations,"
        " see `candidate_macs`):",
        "",
        table(speed, SPEED_COLUMNS),
        "",
    ]
    lines += [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def update_results_md(path: pathlib.Path, section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving other sections alone."""
    update_section(path, BEGIN, END, section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["dwsift"], choices=DATASETS)
    ap.add_argument("--bytes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--time-budget", type=float, default=720.0, help="training seconds per model")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="peak learning rate (cosine over the time budget); 1e-2 trains the cpu"
                         " preset fastest on CPU, 2e-2 diverges")
    ap.add_argument("--rq-beam", type=int, default=5, help="beam of the Faiss RQ initialisation")
    ap.add_argument("--encode-A", type=int, default=None, help="pre-selection for the base encoding"
                    " (default: the model's A)")
    ap.add_argument("--encode-B", type=int, default=None, help="beam for the base encoding"
                    " (default: the model's B)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--speed-rows", type=int, default=4000)
    ap.add_argument("--speed-beams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--baselines", nargs="*", default=["PQ", "RQ", "LSQ"])
    ap.add_argument("--faiss-threads", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lsq-reference", action="store_true",
                    help="when LSQ is not run, add the LSQ figures of the dataset README (Faiss,"
                         " full learn set) as reference rows, marked as such")
    ap.add_argument("--max-learn", type=int, default=None, help="smoke runs: fewer learn vectors")
    ap.add_argument("--max-base", type=int, default=None, help="smoke runs: fewer base vectors")
    ap.add_argument("--max-queries", type=int, default=None, help="smoke runs: fewer queries")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "out" / "codec.json"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--render-only", action="store_true",
                    help="only rewrite the RESULTS.md section from --out (with any --note added)")
    ap.add_argument("--merge", nargs="+", default=[],
                    help="with --render-only: first combine these reports (runs of one model each,"
                         " e.g. run side by side) into --out")
    ap.add_argument("--note", action="append", default=[],
                    help="with --render-only: a note line to store in --out and show under the tables")
    a = ap.parse_args(argv)
    if a.render_only:
        if a.merge:
            report = merge_reports([json.loads(pathlib.Path(f).read_text()) for f in a.merge])
        else:
            report = json.loads(pathlib.Path(a.out).read_text())
        report["notes"] = report.get("notes", []) + a.note
        storage.write_bytes_atomic(a.out, json.dumps(report, indent=2, default=str).encode())
        update_results_md(pathlib.Path(a.results_md), render(report))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import faiss

    command = "python bench/bench_codec.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    report = {"rows": [], "speed": [], "command": command.strip(), "complete": False,
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_start": "/".join(f"{v:.1f}" for v in os.getloadavg()),
              "machine": machine_info(), "torch_threads": a.torch_threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "args": vars(a),
              "code_version": code_version()}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        add_ratios(report["rows"])
        report["load_end"] = "/".join(f"{v:.1f}" for v in os.getloadavg())
        storage.write_bytes_atomic(a.out, json.dumps(report, indent=2, default=str).encode())
        update_results_md(pathlib.Path(a.results_md), render(report))

    for name in a.datasets:
        ds = resolve_dataset(name, a.data_dir)
        data = load_inputs(ds.learn, ds.base, ds.query, ds.groundtruth, max_learn=a.max_learn,
                           max_base=a.max_base, max_queries=a.max_queries)
        for nbytes in a.bytes:
            torch.set_num_threads(a.torch_threads)
            row, speed, _ = run_qinco(name, nbytes, data, a)
            report["rows"].append(row)
            report["speed"] += speed
            save()
            print(table([row], COLUMNS), flush=True)
            print(table(speed, SPEED_COLUMNS), flush=True)
            for method in a.baselines:
                faiss.omp_set_num_threads(a.faiss_threads)
                r = run_baselines(*data, code_bytes=(nbytes,), methods=(method,))[0]
                report["rows"].append({"dataset": name, **r, "threads": a.faiss_threads})
                save()
                print(table([report["rows"][-1]], COLUMNS), flush=True)
            ref = LSQ_REFERENCE.get((name, nbytes))
            if "LSQ" not in a.baselines and a.lsq_reference and ref:
                report["rows"].append({"dataset": name, "method": "LSQ", "bytes": nbytes, **ref,
                                       "factory": f"LSQ{nbytes}x8", "reference_only": True})
                save()
    report["complete"] = True
    report["load_end"] = "/".join(f"{v:.1f}" for v in os.getloadavg())
    save()
    print(table(report["rows"], COLUMNS))
    print(table(report["speed"], SPEED_COLUMNS))
    print(f"wrote {a.out} and {a.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
