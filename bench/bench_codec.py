"""The default training recipe against Faiss PQ / RQ / LSQ: datasets x code sizes x training sets.

One row per (dataset, bytes, training set). Training sets:

- ``learn20k``: the first 20,000 learn vectors only (a small learn set);
- ``learn``: the whole learn set;
- ``learn+base``: the learn set and the base it will index (the production case, ``qinco train
  --sample-from``), never a base row equal to a validation row.

In every row QINCo2 is trained by the default recipe (``pipeline.train.recipe``, what ``qinco
train`` runs without ``--preset``) within the wall-time budget on the training set less ``--val-size``
validation vectors; the full base is encoded and decoded; MSE and R@1/10/100 come from an
exhaustive search of the queries over the decoded base (shipped ground truth); Faiss PQ, RQ
(beam 5) and LSQ are trained in the same process on the same training set (its validation
vectors included) and measured the same way. The targets, against LSQ trained on the same vectors:
``learn`` and ``learn+base`` MSE <= 0.85 x LSQ and R@1 >= LSQ + 0.03; ``learn20k`` MSE <= 0.95 x LSQ
and R@1 >= LSQ.

Resumable per row: each row is one JSON file in ``--work``, written after QINCo and after each
baseline; a re-run skips what is done. ``--jobs 2`` runs rows side by side, one process and one
thread each. The table of every row in ``--work`` goes to ``--out`` and a section of
``bench/RESULTS.md``.

    .venv/bin/python bench/bench_codec.py --datasets debdesc384 --bytes 8 16 --jobs 2
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
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.codec.decoder import decode, reconstruction_mse  # noqa: E402
from pipeline.codec.encoder import encode  # noqa: E402
from pipeline.codec.model import config_from_preset  # noqa: E402
from pipeline.config import code_version  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.search.evaluation import recall_at, search_decoded  # noqa: E402
from pipeline.stages.baselines import load_inputs, run_baselines  # noqa: E402
from pipeline.stages.datasets import DATASETS, resolve_dataset  # noqa: E402
from pipeline.sysinfo import machine_info  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.loop import train_model  # noqa: E402
from pipeline.train.recipe import AUTO, apply_recipe, choose_recipe  # noqa: E402
from pipeline.train.setup import rows_not_in  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402

BEGIN = "<!-- section: codec-table (bench/bench_codec.py) -->"
END = "<!-- end section: codec-table -->"
log = logging.getLogger("bench_codec")
TRAIN_SETS = ("learn20k", "learn", "learn+base")
SMALL_LEARN = 20_000
# (MSE at most this x LSQ's, R@1 at least LSQ's + this) per training set
TARGETS = {"learn20k": (0.95, 0.0), "learn": (0.85, 0.03), "learn+base": (0.85, 0.03)}
COLUMNS = ("dataset", "train_set", "bytes", "method", "n_train", "mse", "mse_vs_LSQ", "R@1", "R@1_vs_LSQ",
           "R@10", "train_s", "encode_vps", "decode_vps", "target")


def row_key(dataset: str, nbytes: int, train_set: str) -> str:
    return f"{dataset}-{nbytes}B-{train_set.replace('+', '_')}"


def training_set(train_set: str, xt: np.ndarray, xb: np.ndarray, val_size: int, seed: int = 0):
    """``(x_train, x_val)``: the validation vectors are drawn from the learn vectors of the set;
    for ``learn+base`` the base rows equal to a validation vector are left out."""
    learn = xt[:SMALL_LEARN] if train_set == "learn20k" else xt
    perm = np.random.default_rng(seed).permutation(len(learn))
    x_val, x_train = learn[perm[:val_size]], learn[np.sort(perm[val_size:])]
    if train_set == "learn+base":
        x_train = np.concatenate([x_train, xb[rows_not_in(xb, x_val)]])
    return np.ascontiguousarray(x_train, dtype=np.float32), np.ascontiguousarray(x_val, dtype=np.float32)


def timed(fn):
    """``(result, wall seconds)`` of ``fn()``."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_qinco(name: str, nbytes: int, train_set: str, x_train, x_val, xb, xq, gt, a) -> dict:
    d = x_train.shape[1]
    tcfg = TrainConfig(epochs=a.max_epochs, time_budget_s=a.time_budget, patience=a.patience,
                       val_size=len(x_val), lr_schedule="time", seed=a.seed)
    if a.preset == AUTO:
        qcfg, tcfg, recipe = apply_recipe(choose_recipe(len(x_train), d, nbytes, 256, "cpu"), {}, tcfg)
        recipe = recipe.to_dict()
    else:
        qcfg, recipe = config_from_preset(a.preset, d, M=nbytes, K=256), None
        tcfg = tcfg.replace(lr=1e-2)
    log.info("%s %d B %s: training on %d vectors for %.0f s (%s)", name, nbytes, train_set, len(x_train),
             a.time_budget, qcfg)
    (model, history), train_s = timed(lambda: train_model(x_train, x_val, qcfg, tcfg))
    model.eval()
    (codes, _), enc_s = timed(lambda: encode(model, xb, progress=True, source=name + " base"))
    xhat, dec_s = timed(lambda: decode(model, codes))
    _, I = search_decoded(xq, xhat, 100)
    return {"method": "QINCo2", "factory": f"{a.preset} M={nbytes} K=256", "mse": reconstruction_mse(xb, xhat),
            **recall_at(I, gt, (1, 10, 100)), "train_s": train_s, "encode_vps": len(xb) / enc_s,
            "decode_vps": len(xb) / dec_s, "A": qcfg.A, "B": qcfg.B, "time_budget_s": a.time_budget,
            "epochs_run": sum(1 for h in history if h.get("epoch", 0) > 0),
            "best_epoch": min(history, key=lambda h: h["val_mse"]).get("epoch", 0),
            "val_mse_rq_init": history[0]["val_mse"], "val_mse_best": min(h["val_mse"] for h in history),
            "train_mse_last": history[-1].get("train_mse"), "model_config": qcfg.to_dict(),
            "train_config": tcfg.to_dict(), "recipe": recipe}


def run_row(name: str, nbytes: int, train_set: str, a) -> dict:
    """Train, encode and measure one row (QINCo2 and the baselines), saving after each method."""
    path = pathlib.Path(a.work) / f"{row_key(name, nbytes, train_set)}.json"
    part = json.loads(path.read_text()) if path.exists() else {
        "dataset": name, "bytes": nbytes, "train_set": train_set, "rows": [],
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(), "code_version": code_version(), "threads": a.threads,
        "command": "python bench/bench_codec.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])}
    if a.redo and any(r["method"] in a.redo for r in part["rows"]):
        # a method measured again (after a recipe change): its old row goes, the others stay
        part["rows"] = [r for r in part["rows"] if r["method"] not in a.redo]
        part["command"] += "; then python bench/bench_codec.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    done = {r["method"] for r in part["rows"]}
    todo = [m for m in ["QINCo2", *a.baselines] if m not in done]
    if not todo:
        return part
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    ds = resolve_dataset(name, a.data_dir)
    xt, xb, xq, gt = load_inputs(ds.learn, ds.base, ds.query, ds.groundtruth, max_base=a.max_base,
                                 max_queries=a.max_queries)
    xb, xq = np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(xq, dtype=np.float32)
    x_train, x_val = training_set(train_set, np.asarray(xt, dtype=np.float32), xb, a.val_size, a.seed)
    common = {"dataset": name, "bytes": nbytes, "train_set": train_set, "n_base": len(xb), "n_query": len(xq)}

    def save(row: dict) -> None:
        part["rows"].append({**common, **row, "threads": a.threads})
        storage.write_bytes_atomic(str(path), json.dumps(part, indent=2, default=str).encode())
        print(table(part["rows"], COLUMNS), flush=True)

    for method in todo:
        if method == "QINCo2":
            save({**run_qinco(name, nbytes, train_set, x_train, x_val, xb, xq, gt, a), "n_train": len(x_train)})
        else:
            # the baselines train on every vector of the set, its validation vectors included
            r = run_baselines(np.concatenate([x_train, x_val]), xb, xq, gt, code_bytes=(nbytes,), methods=(method,))[0]
            save({**r, "n_train": len(x_train) + len(x_val)})
    return part


def _fmt(key, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key == "mse":
        return f"{v:,.6g}" if abs(v) < 100 else f"{v:,.0f}"
    if key.startswith("R@") and key.endswith("vs_LSQ"):
        return f"{v:+.3f}"
    if key.startswith("R@") or key == "mse_vs_LSQ":
        return f"{v:.3f}"
    if key == "train_s":
        return f"{v:.0f}"
    if key in ("encode_vps", "decode_vps", "n_train"):
        return f"{v:,.0f}"
    return str(v)


def table(rows: list[dict], columns) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[j]) for x in cells]) for j, c in enumerate(cols)]
    text = ("dataset", "method", "train_set", "target")
    num = [c not in text for c in cols]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, num)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, num)) + "|"
    return "\n".join([line(cols), sep] + [line(x) for x in cells])


def judge(rows: list[dict]) -> None:
    """Ratios to LSQ of the same row, and whether QINCo2 meets its training set's target."""
    for r in rows:
        lsq = next((x for x in rows if x["method"] == "LSQ" and all(
            x[k] == r[k] for k in ("dataset", "bytes", "train_set"))), None)
        if lsq is None:
            continue
        r["mse_vs_LSQ"] = r["mse"] / lsq["mse"]
        r["R@1_vs_LSQ"] = r["R@1"] - lsq["R@1"]
        if r["method"] != "QINCo2":
            continue
        max_mse, min_gain = TARGETS[r["train_set"]]
        missed = []
        if r["mse_vs_LSQ"] > max_mse:
            missed.append(f"MSE > {max_mse} x LSQ")
        if r["R@1_vs_LSQ"] < min_gain - 1e-9:
            missed.append(f"R@1 < LSQ {min_gain:+.2f}")
        r["target"] = "met" if not missed else "missed: " + ", ".join(missed)


def collect(work: str) -> list[dict]:
    rows = []
    for p in sorted(pathlib.Path(work).glob("*.json")):
        rows += json.loads(p.read_text())["rows"]
    order = {m: i for i, m in enumerate(("QINCo2", "LSQ", "RQ", "PQ"))}
    rows.sort(key=lambda r: (r["dataset"], r["bytes"], TRAIN_SETS.index(r["train_set"]), order.get(r["method"], 9)))
    judge(rows)
    return rows


def _recipes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        rec = r.get("recipe")
        if not rec:
            continue
        m = r["model_config"]
        out.append(f"{r['dataset']} {r['bytes']} B {r['train_set']} ({r['n_train']:,} vectors): de={m['de']}, "
                   f"dh={m['dh']}, L={m['L']}, A={m['A']}, B={m['B']}, B_train={m['B_train']}, lr "
                   f"{r['train_config']['lr']:g}, batch {r['train_config']['batch_size']}, input noise "
                   f"{r['train_config'].get('input_noise', 0):g}; "
                   f"{r['epochs_run']} epochs (best {r['best_epoch']}), validation MSE {r['val_mse_rq_init']:.4g} "
                   f"at the RQ initialisation, {r['val_mse_best']:.4g} at the best epoch "
                   f"(last epoch's training MSE {r['train_mse_last']:.4g}"
                   + (", on the noisy inputs)" if r['train_config'].get('input_noise') else ")"))
    return out


def render(rows: list[dict], work: str) -> str:
    parts = [json.loads(p.read_text()) for p in sorted(pathlib.Path(work).glob("*.json"))]
    m = parts[0]["machine"] if parts else machine_info()
    budgets = sorted({r["time_budget_s"] for r in rows if "time_budget_s" in r})
    lines = [
        "## The default recipe against Faiss: datasets x sizes x training sets (bench/bench_codec.py)",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; each row one process of one thread, two rows"
        " side by side",
        f"- rows started {min((p['started'] for p in parts), default='-')} to {max((p['started'] for p in parts), default='-')};"
        f" commands: " + "; ".join(sorted({f'`{p["command"]}`' for p in parts})),
        f"- QINCo2: the default recipe, trained {', '.join(f'{b:.0f} s' for b in budgets) or '-'} (wall time,"
        " initialisation included) on the training set less 2,000 validation vectors, base encoded with"
        " the recipe's A and B; Faiss PQ, RQ (beam 5), LSQ trained on the whole training set in the same"
        " process; `mse_vs_LSQ` and `R@1_vs_LSQ` against LSQ of the same row; targets: learn and"
        " learn+base MSE <= 0.85 x LSQ and R@1 >= LSQ + 0.03, learn20k MSE <= 0.95 x LSQ and R@1 >= LSQ",
        "",
        table(rows, COLUMNS),
        "",
        "What the recipe chose, and how training went:",
        "",
    ]
    lines += [f"- {x}" for x in _recipes(rows)]
    return "\n".join(lines)


def run_parallel(keys: list[tuple[str, int, str]], a, argv: list[str]) -> None:
    """Each row in its own process (one thread), ``a.jobs`` at a time."""
    pending, running = list(keys), []
    base = [sys.executable, str(pathlib.Path(__file__).resolve())] + argv + ["--threads", "1"]
    while pending or running:
        while pending and len(running) < a.jobs:
            name, nbytes, ts = pending.pop(0)
            logf = open(pathlib.Path(a.work) / f"{row_key(name, nbytes, ts)}.log", "a")
            cmd = base + ["--row", name, str(nbytes), ts]
            log.info("starting %s", " ".join(shlex.quote(c) for c in cmd[1:]))
            running.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), (name, nbytes, ts)))
        time.sleep(5)
        for p, key in list(running):
            if p.poll() is not None:
                running.remove((p, key))
                log.info("row %s ended with exit status %d", row_key(*key), p.returncode)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--bytes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--train-sets", nargs="+", default=list(TRAIN_SETS), choices=TRAIN_SETS)
    ap.add_argument("--preset", default=AUTO, help="auto: the default recipe; or an expert preset")
    ap.add_argument("--time-budget", type=float, default=1800.0, help="training seconds per model")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", nargs="*", default=["PQ", "RQ", "LSQ"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and Faiss threads per row")
    ap.add_argument("--jobs", type=int, default=1, help="rows run side by side (one thread each)")
    ap.add_argument("--redo", nargs="+", default=[], metavar="METHOD",
                    help="measure these methods again in rows that have them (e.g. QINCo2 after a recipe change)")
    ap.add_argument("--max-base", type=int, default=None, help="smoke runs: fewer base vectors")
    ap.add_argument("--max-queries", type=int, default=None, help="smoke runs: fewer queries")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", default=str(HERE / "out" / "codec_rows"), help="one JSON file per row")
    ap.add_argument("--out", default=str(HERE / "out" / "codec.json"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--render-only", action="store_true", help="only write the table of the rows in --work")
    ap.add_argument("--row", nargs=3, metavar=("DATASET", "BYTES", "TRAIN_SET"), default=None,
                    help="run this one row (what --jobs starts)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pathlib.Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.row:
        run_row(a.row[0], int(a.row[1]), a.row[2], a)
        return 0
    if not a.render_only:
        keys = [(d, b, t) for d in a.datasets for b in a.bytes for t in a.train_sets]
        if a.jobs > 1:
            run_parallel(keys, a, argv)
        else:
            for key in keys:
                run_row(*key, a)
    rows = collect(a.work)
    storage.write_bytes_atomic(a.out, json.dumps({"rows": rows}, indent=2, default=str).encode())
    section = render(rows, a.work)
    update_section(pathlib.Path(a.results_md), BEGIN, END, section)
    print(table(rows, COLUMNS))
    print(f"wrote {a.out} and {a.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
