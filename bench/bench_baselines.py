"""Faiss baselines (PQ, OPQ, RQ, LSQ at 8 and 16 bytes) on the real datasets, full sets.

Writes ``bench/out/baselines.json`` and the "Faiss baselines" section of ``bench/RESULTS.md``.
Both are rewritten after every measured row, so an interrupted run still leaves its figures,
and ``--resume`` keeps the rows of an earlier run instead of measuring them again. LSQ (by far
the slowest to train and encode) runs after all other methods.

    .venv/bin/python bench/bench_baselines.py [--datasets dwsift glove50] [--bytes 8 16] [--resume]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import shlex
import sys
import time

from pipeline.io import storage
from pipeline.stages.baselines import format_table, load_inputs, METHODS, run_baselines
from pipeline.sysinfo import machine_info
from pipeline.config import code_version
from pipeline.stages.datasets import DATASETS, resolve_dataset

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import update_section  # noqa: E402
BEGIN = "<!-- section: faiss-baselines (bench/bench_baselines.py) -->"
END = "<!-- end section: faiss-baselines -->"


def update_results_md(path: pathlib.Path, section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving other sections alone."""
    update_section(path, BEGIN, END, section)


def render_section(rows: list[dict], machine: dict, command: str, started: str, done: bool) -> str:
    lines = [
        "## Faiss baselines",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores ({machine['platform']}),"
        " shared with other jobs, so times are indicative only",
        f"- date: {started}" + ("" if done else " (run incomplete: rows so far)"),
        f"- command: `{command}`",
        "- protocol: codebooks trained on all of learn with Faiss defaults (RQ beam 5; PQ without"
        " the polysemous re-ordering, which only permutes code ids), full base encoded and decoded,"
        " exhaustive search of all queries over the decoded base; R@k = the true nearest"
        " neighbour is in the top k; MSE = mean squared L2 reconstruction error per vector;"
        " encode_vps includes decoding; threads = Faiss OpenMP threads used for the row.",
        "- glove50 (d=50): PQ/OPQ need d divisible by the number of sub-quantizers, so PQ zero-pads"
        " to 56 / 64 dimensions (`Pad56`) and OPQ rotates into 56 / 64 dimensions (`OPQ8_56`).",
        "",
    ]
    if not done:
        have = {(r["dataset"], r["bytes"], r["method"]) for r in rows}
        todo = [f"{d} {m} {b} B" for d in DATASETS for b in (8, 16) for m in METHODS
                if (d, b, m) not in have]
        lines += ["- not measured (run stopped before reaching them; LSQ runs last): "
                  + ", ".join(todo), ""]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        lines += [f"### {name}", "", format_table([r for r in rows if r["dataset"] == name]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--bytes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "out" / "baselines.json"))
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--threads", type=int, default=1,
                    help="Faiss OpenMP threads (1 is fastest on small, shared machines)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    ap.add_argument("--render-only", action="store_true",
                    help="only rewrite the RESULTS.md section from the rows in --out")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python bench/bench_baselines.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info()
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rows: list[dict] = []
    if a.resume and pathlib.Path(a.out).exists():
        rows = [r for r in json.loads(pathlib.Path(a.out).read_text())["rows"]
                if r["dataset"] in a.datasets and r["bytes"] in a.bytes and r["method"] in a.methods]
    done_keys = {(r["dataset"], r["bytes"], r["method"]) for r in rows}
    slow_last = [m for m in a.methods if m != "LSQ"] + [m for m in a.methods if m == "LSQ"]
    plan = [(m, name, b) for m in slow_last for name in a.datasets for b in a.bytes]

    def save(done: bool) -> None:
        report = {"rows": rows, "command": command, "started": started, "complete": done,
                  "machine": machine, "code_version": code_version()}
        storage.write_bytes_atomic(a.out, json.dumps(report, indent=2).encode())
        update_results_md(pathlib.Path(a.results_md), render_section(rows, machine, command.strip(), started, done))

    if a.render_only:
        prev = json.loads(pathlib.Path(a.out).read_text())
        update_results_md(pathlib.Path(a.results_md),
                          render_section(prev["rows"], prev["machine"], prev["command"].strip(),
                                         prev["started"], prev["complete"]))
        return 0
    t0 = time.perf_counter()
    loaded: dict[str, tuple] = {}
    for method, name, nbytes in plan:
        if (name, nbytes, method) in done_keys:
            continue
        if name not in loaded:
            ds = resolve_dataset(name, a.data_dir)
            loaded[name] = load_inputs(ds.learn, ds.base, ds.query, ds.groundtruth)
        xt, xb, xq, gt = loaded[name]
        row = run_baselines(xt, xb, xq, gt, code_bytes=(nbytes,), methods=(method,))[0]
        rows.append({"dataset": name, **row, "threads": a.threads})
        rows.sort(key=lambda r: (a.datasets.index(r["dataset"]), r["bytes"], a.methods.index(r["method"])))
        save(done=False)
        print(format_table([{"dataset": name, **row}]), flush=True)
    save(done=True)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {a.out} and {a.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
