"""The ``qinco`` command line (also ``python -m pipeline``).

This module only parses arguments, calls the Python API (``pipeline.api``, one call per command,
the options as keywords) and prints what it returns. Each sub-command has one ``_add_<name>``
function that declares its arguments and a handler that imports its API call when it runs: the
only function-local imports of the package, so that ``qinco --help`` and commands that need
neither torch nor Ray start without loading them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, Sequence

from pipeline import __version__
from pipeline.errors import find_pipeline_error

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


class Number:
    """An argparse ``type`` for an int or float option in ``[lo, hi]`` (``lo`` excluded with
    ``lo_open``): a value outside, NaN or inf stops the command in the parser with one line and
    exit status 2, before any work. Every numeric option of the CLI uses one."""

    def __init__(self, kind: type, lo: float, hi: float, lo_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        return f"{what} {'>' if self.lo_open else '>='} {self.lo:,} and <= {self.hi:,}"

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not math.isfinite(v) or v < self.lo or (self.lo_open and v == self.lo) or v > self.hi:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return v


class ByteSize(Number):
    """A size in bytes, plain or with a binary suffix (``512M``, ``4G``, ``1.5T``), range-checked
    like every number."""

    _UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def __init__(self, lo: int, hi: int):
        super().__init__(int, lo, hi)

    def describe(self) -> str:
        return f"a size from {self.lo:,} to {self.hi:,} bytes (suffixes K, M, G, T allowed)"

    def __call__(self, text: str):
        t = text.strip().upper().removesuffix("IB").removesuffix("B")
        unit = t[-1:] if t[-1:] in "KMGT" and t[-1:] else ""
        try:
            v = float(t[:-1] if unit else t) * self._UNITS[unit]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not math.isfinite(v) or v < self.lo or v > self.hi:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return int(v)


class OrAuto(Number):
    """A range-checked number, or the word ``auto`` (returned as the string ``"auto"``)."""

    def describe(self) -> str:
        return "auto or " + super().describe()

    def __call__(self, text: str):
        return AUTO_WORD if text.strip().lower() == AUTO_WORD else super().__call__(text)


AUTO_WORD = "auto"


def count(lo: int, hi: int) -> Number:
    return Number(int, lo, hi)


def real(lo: float, hi: float, lo_open: bool = False) -> Number:
    return Number(float, lo, hi, lo_open)


# Bounds shared by several commands. Upper bounds are far above any sensible value; they stop a
# typo from asking for terabytes before anything checks it.
ROWS = count(1, 2**40)                 # a number of vectors
WORKERS = count(1, 4096)
CPUS = real(0, 1024, lo_open=True)
GPUS = real(0, 64)
BATCH = count(1, 2**24)
SEED = count(0, 2**32 - 1)
CODE_BYTES = count(1, 1024)
BEAM = count(1, 4096)
LISTS = OrAuto(int, 0, 2**24)         # 0: no IVF; auto: from the number of vectors
NEIGHBOURS = count(1, 100_000)
CANDIDATES = count(1, 10_000_000)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit status 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _echo(message: str) -> None:
    print(message, flush=True)


def _print_json(report: dict, keys: Sequence[str] | None = None) -> None:
    """``report`` (only ``keys``, those present, when given) as indented JSON on stdout."""
    import json

    shown = report if keys is None else {k: report[k] for k in keys if k in report}
    print(json.dumps(shown, indent=2, default=str))


def command(fn: Callable[[argparse._SubParsersAction], None]):
    """Register a function that adds one sub-command parser."""
    _COMMANDS.append(fn)
    return fn


# --------------------------------------------------------------------------- demo
@command
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo job on the embedded default")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $QINCO_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default="demo-out", help="output folder or URI (default: ./demo-out)")
    p.add_argument("--quick", action="store_true", help="smallest sizes (used by the tests)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import demo

        demo(data_dir=a.data_dir, out=a.out, quick=a.quick)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- train
@command
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a QINCo model (in-process, or on Ray Train with --workers)")
    p.add_argument("--data", required=True, nargs="+",
                   help="training vectors: files (fvecs/bvecs/fbin/u8bin/npy/parquet/..., local or s3://), folders "
                        "or quoted glob patterns ('s3://bucket/emb/*.parquet'), expanded in sorted order")
    p.add_argument("--out", required=True, help="model directory (local or s3:// prefix)")
    p.add_argument("--preset", default="auto",
                   help="auto (default): the model size, beam, learning rate and batch chosen from the number "
                        "and dimension of the training vectors, recorded with the model; or an expert preset: "
                        "cpu, qinco1, qinco2-S/M/L")
    p.add_argument("--bytes", type=CODE_BYTES, default=None,
                   help="code size in bytes per vector (M = bytes with the default K=256)")
    p.add_argument("--sample-from", nargs="+", default=None, metavar="URI",
                   help="also train on vectors of these files, e.g. the files to be indexed (the production "
                        "default): streamed, never a row equal to a validation row")
    p.add_argument("--sample-size", type=count(0, 2**40), default=1_000_000,
                   help="rows drawn from --sample-from (default 1,000,000; 0: all)")
    _add_column_options(p)
    for name, typ in (("M", CODE_BYTES), ("K", count(2, 65536)), ("L", count(0, 64)), ("h", count(1, 65536)),
                      ("de", count(1, 65536)), ("dh", count(1, 65536)), ("A", count(1, 65536)),
                      ("B", BEAM), ("B-train", BEAM)):
        p.add_argument(f"--{name}", type=typ, default=None, help=f"override the preset's {name}")
    p.add_argument("--epochs", type=count(0, 10**6), default=None,
                   help="at most N passes over the training set (default: 10, or with --time-budget until "
                        "the budget or early stopping ends training)")
    p.add_argument("--patience", type=count(1, 10**6), default=None,
                   help="stop after N epochs without a better validation MSE (default 10)")
    p.add_argument("--max-train", type=ROWS, default=None, help="use at most N training vectors")
    p.add_argument("--val", type=count(1, 10**8), default=2000, help="held-out validation vectors (default 2000)")
    p.add_argument("--time-budget", type=real(0, 10**8, lo_open=True), default=None,
                   help="train for S seconds (initialisation included); the learning rate anneals over them")
    p.add_argument("--batch-size", type=BATCH, default=None,
                   help="training batch (default: the recipe's, 1024 for the presets)")
    p.add_argument("--lr", type=real(0, 10, lo_open=True), default=None,
                   help="peak learning rate (default: the recipe's; 1e-2 for the cpu preset, else 8e-4); "
                        "with --time-budget the cosine decay follows the budget")
    p.add_argument("--input-noise", type=real(0, 10), default=None, metavar="S",
                   help="Gaussian noise on the training vectors, std S x the RMS quantization error per "
                        "dimension (default: the recipe's, from the training vectors per codeword; 0: none)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (in-process training)")
    p.add_argument("--metric", choices=["l2", "ip", "cosine"], default="l2",
                   help="what searches of the index rank by: l2 (squared distance, default), ip (inner "
                        "product) or cosine (vectors divided by their norms for training, encoding and "
                        "queries); stored with the model and every index built with it")
    p.add_argument("--ivf", type=LISTS, default=AUTO_WORD, metavar="NLIST",
                   help="IVF lists of the coarse quantizer trained first (IVF-QINCo); 0: none (a flat index, "
                        "every search scans every code); auto (default): none below 100,000 vectors in --data "
                        "and --sample-from, else the power of two nearest 8 sqrt(N), at most 1/39 of the k-means "
                        "sample; give NLIST when the index will hold many more vectors than those")
    p.add_argument("--workers", type=count(0, 4096), default=0,
                   help="Ray Train workers (DDP); 0 trains in this process without Ray (default 0)")
    p.add_argument("--gpus-per-worker", type=GPUS, default=0.0)
    p.add_argument("--cpus-per-worker", type=CPUS, default=None,
                   help="CPUs each Ray Train worker reserves (default: 1, or less so that all workers fit "
                        "with half a CPU left for the data reads)")
    p.add_argument("--threads-per-worker", type=count(0, 1024), default=0,
                   help="torch threads per worker (default: the reserved CPUs, at least 1)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the checkpoints of an earlier run at --out instead of resuming it")
    p.add_argument("--stop-after-epochs", type=count(1, 10**6), default=None,
                   help="end this invocation after N epochs; re-running the command resumes (Ray Train only)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import train

        summary = train(
            a.data, a.out, preset=a.preset, code_bytes=a.bytes, M=a.M, K=a.K, L=a.L, h=a.h, de=a.de, dh=a.dh,
            A=a.A, B=a.B, B_train=a.B_train, ivf=a.ivf, metric=a.metric, epochs=a.epochs, patience=a.patience,
            max_train=a.max_train, val_size=a.val, time_budget_s=a.time_budget, batch_size=a.batch_size, lr=a.lr,
            input_noise=a.input_noise, seed=a.seed, device=a.device, sample_from=a.sample_from,
            sample_size=a.sample_size, vector_column=a.vector_column, id_column=a.id_column, workers=a.workers,
            cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
            threads_per_worker=a.threads_per_worker, fresh=a.fresh, stop_after_epochs=a.stop_after_epochs,
            echo=_echo)
        if a.workers > 0:
            _print_json({k: v for k, v in summary.items() if k != "history"})
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- encode
@command
def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode vector files into IVF shards on Ray (or one codes file)",
                       description="With an --out ending in .parquet, encode one file in this process into a "
                                   "codes file. Otherwise --out is an index prefix: Ray Data reads the files in "
                                   "byte ranges, an actor pool encodes them, and shards plus a manifest are "
                                   "committed atomically (resumable: re-run the same command after a failure).")
    p.add_argument("--model", required=True, help="model directory (local or s3://)")
    p.add_argument("--data", required=True, nargs="+",
                   help="vector files, folders or quoted glob patterns ('s3://bucket/emb/*.parquet') to encode; "
                        "each folder or pattern expands in sorted order, and ids follow that order")
    p.add_argument("--out", required=True, help="index URI, or a codes file ending in .parquet")
    p.add_argument("--workers", type=WORKERS, default=2, help="encoder actors (index mode, default 2)")
    p.add_argument("--cpus-per-worker", type=CPUS, default=None,
                   help="CPUs each actor reserves (default: 1, or less so that all actors fit on the cluster)")
    p.add_argument("--gpus-per-worker", type=GPUS, default=0.0)
    p.add_argument("--shard-rows", type=count(1, 2**31 - 1), default=65536, help="vectors per read task and shard (default 65536)")
    p.add_argument("--batch-size", type=BATCH, default=None, help="encoder batch size (default: sized from B and A)")
    p.add_argument("--fmt", default=None, help="input format when the extension does not tell")
    _add_column_options(p)
    p.add_argument("--overwrite", action="store_true", help="build a new version over a different index")
    p.add_argument("--skip-bad-ranges", action="store_true",
                   help="skip unreadable row ranges (listed in the report) instead of failing")
    p.add_argument("--B", type=BEAM, default=None, help="beam size (default: the model's)")
    p.add_argument("--A", type=count(1, 65536), default=None, help="pre-selected candidates (default: the model's)")
    p.add_argument("--lut-weight", type=real(0, 1e6), default=0.0,
                   help="choose each vector's codes among the final beam by neural error + this "
                        "weight x lookup-table error, so the search's lookup-table stage ranks them better "
                        "(default 0: the neural best)")
    p.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the encoder network's arithmetic (default: float16 on a GPU, float32 on CPU); "
                        "bfloat16 encodes faster on CPUs with bfloat16 instructions, with a "
                        "slightly higher error (bench/RESULTS.md)")
    p.add_argument("--block-rows", type=count(1, 2**28), default=65536, help="vectors read per block")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (vectors, shards, disk, actors and their memory, time from the cost "
                        "model) and check it against the cluster (or this machine) and the disk; encode nothing")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import check_plan, encode_files, format_plan, plan_encode

        common = dict(workers=a.workers, cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                      shard_rows=a.shard_rows, fmt=a.fmt, vector_column=a.vector_column, id_column=a.id_column,
                      A=a.A, B=a.B)
        if a.dry_run:
            plan = plan_encode(a.model, a.data, a.out, **common)
            print(format_plan(plan))
            check_plan(plan)
            return 0
        report = encode_files(a.model, a.data, a.out, **common, batch_size=a.batch_size, overwrite=a.overwrite,
                              skip_bad_ranges=a.skip_bad_ranges, lut_weight=a.lut_weight, precision=a.precision,
                              block_rows=a.block_rows, device=a.device, echo=_echo)
        if "version" in report:  # an index (a codes file's encode has printed its line)
            _print_json(report, ("status", "version", "vectors", "shards", "vectors_encoded_this_run",
                                 "vectors_per_s", "wall_s", "bad_ranges"))
        return 0

    p.set_defaults(func=run)


def _add_column_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vector-column", default=None, metavar="NAME",
                   help="parquet inputs: the column holding the vectors (default: vector)")
    p.add_argument("--id-column", default=None, metavar="NAME",
                   help="parquet inputs: the column holding the int64 ids, when present (default: id)")


# --------------------------------------------------------------------------- decode
@command
def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode a codes file back to vectors")
    p.add_argument("--model", required=True, help="model directory (local or s3://)")
    p.add_argument("--codes", required=True, help="codes file written by `qinco encode`")
    p.add_argument("--out", required=True, help="vector file to write (format from the extension)")
    p.add_argument("--prefix", type=CODE_BYTES, default=None, help="decode only the first m codes")
    p.add_argument("--device", default="cpu")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import decode_file

        decode_file(a.model, a.codes, a.out, prefix=a.prefix, device=a.device, echo=_echo)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- baselines
@command
def _add_baselines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baselines", help="measure Faiss PQ/OPQ/RQ/LSQ baselines (MSE, recall)")
    p.add_argument("--dataset", default=None, help="dataset name (dwsift, glove50) instead of the four URIs")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $QINCO_DATA_DIR or ../shared/data)")
    p.add_argument("--learn", help="training vectors (file or URI)")
    p.add_argument("--base", help="database vectors")
    p.add_argument("--queries", help="query vectors")
    p.add_argument("--groundtruth", help="exact neighbours of the queries in the base (.ivecs); computed if omitted")
    p.add_argument("--bytes", type=CODE_BYTES, nargs="+", default=[8, 16], help="code sizes in bytes")
    p.add_argument("--methods", nargs="+", default=["PQ", "OPQ", "RQ", "LSQ"],
                   choices=["PQ", "OPQ", "RQ", "LSQ"])
    p.add_argument("--max-learn", type=ROWS, default=None, help="use only the first N training vectors")
    p.add_argument("--max-base", type=ROWS, default=None,
                   help="use only the first N base vectors (the ground truth is then recomputed)")
    p.add_argument("--max-queries", type=ROWS, default=None, help="use only the first N queries")
    p.add_argument("--k", type=NEIGHBOURS, default=100, help="results per query")
    p.add_argument("--seed", type=SEED, default=1234)
    p.add_argument("--metric", choices=["l2", "ip", "cosine"], default="l2",
                   help="rank neighbours (the ground truth and the quantizers' search) by this metric, as an "
                        "index trained with `qinco train --metric` does (default l2)")
    p.add_argument("--out", required=True, help="JSON results file (written atomically)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import baselines

        baselines(a.out, learn=a.learn, base=a.base, queries=a.queries, groundtruth=a.groundtruth,
                  dataset=a.dataset, data_dir=a.data_dir, bytes=a.bytes, methods=a.methods, max_learn=a.max_learn,
                  max_base=a.max_base, max_queries=a.max_queries, k=a.k, seed=a.seed, metric=a.metric)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- search
@command
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="answer k-NN queries against an index on a Ray cluster (shard actors)")
    p.add_argument("--index", required=True, help="index URI (written by `qinco encode`)")
    p.add_argument("--queries", required=True, help="query vectors file URI")
    p.add_argument("--vector-column", default=None, metavar="NAME",
                   help="parquet queries (and tuning queries): the column holding the vectors (default: vector)")
    p.add_argument("--k", type=NEIGHBOURS, default=10, help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=count(1, 2**24), default=16, help="IVF lists probed per query (default 16)")
    p.add_argument("--probe-ratio", type=real(1, 1e6), default=None, metavar="R",
                   help="adaptive nprobe: of the --nprobe nearest lists, visit only those whose centroid's squared "
                        "distance is at most R times the nearest one's (R >= 1; default: all --nprobe lists)")
    p.add_argument("--shortlist", type=CANDIDATES, default=100,
                   help="candidates kept by the lookup-table stage for QINCo re-ranking (default 100)")
    p.add_argument("--rerank", type=count(0, 10_000_000), default=None, metavar="R",
                   help="decode only the best R of the shortlist (default: all of it; 0: none, as --no-rerank); "
                        "with R < k the results after the first R keep the lookup-table order and distances")
    p.add_argument("--no-rerank", action="store_true", help="return the lookup-table ranking (no QINCo decode)")
    p.add_argument("--pairwise-shortlist", type=CANDIDATES, default=None, metavar="S2",
                   help="rank the shortlist with the model's pairwise decoder (tables over pairs of codes, "
                        "fitted by `qinco train`) and keep its best S2 for the QINCo re-rank "
                        "(k <= S2 <= --shortlist; default: no pairwise stage)")
    p.add_argument("--rerank-precision", choices=["float32", "bfloat16"], default="float32",
                   help="arithmetic of the QINCo decoder in the re-rank; bfloat16 is faster on CPUs "
                        "with AVX512-BF16/AMX, distances stay float32/float64 (default float32)")
    p.add_argument("--no-lut-scales", action="store_true",
                   help="rank the shortlist with the plain additive decoder; by default each row's additive "
                        "residual is scaled towards its QINCo reconstruction (a better shortlist; the scales "
                        "are stored in the shards, or computed when the actors load shards written without them)")
    p.add_argument("--prefix-steps", type=count(0, 1024), default=0, metavar="P",
                   help="scan the probed lists with the lookup tables of the first P codebooks only, keep the "
                        "best --prefix-shortlist and rank those with all of them: a faster scan (default 0: off)")
    p.add_argument("--prefix-shortlist", type=CANDIDATES, default=None, metavar="S1",
                   help="candidates kept by the --prefix-steps scan (default 4 x shortlist)")
    p.add_argument("--workers", type=WORKERS, default=2, help="shard actors (default 2)")
    p.add_argument("--cpus-per-worker", type=CPUS, default=None,
                   help="CPUs each actor reserves (default: 1, or less so that all actors fit on the cluster)")
    p.add_argument("--query-batch", type=count(1, 2**20), default=2048)
    p.add_argument("--max-queries", type=ROWS, default=None)
    p.add_argument("--version", default=None, help="index version (default: CURRENT)")
    p.add_argument("--allow-partial", action="store_true",
                   help="return results from the shards that answered and report those that did not")
    p.add_argument("--memory-per-actor", type=ByteSize(64 << 20, 1 << 42), default=None,
                   help="memory each shard actor may use (e.g. 8G): shards are placed to fit it, Ray "
                        "places the actors where it is free, and an index that cannot fit is refused")
    p.add_argument("--mmap-dir", default=None, metavar="DIR",
                   help="a local directory on every node (e.g. an NVMe disk): each shard actor writes its "
                        "rows there and memory-maps them, so an actor can search more codes than its memory "
                        "holds (removed when the search ends)")
    p.add_argument("--target-recall", type=real(0.0, 1.0, lo_open=True), default=None, metavar="R",
                   help="choose --nprobe, --shortlist and --rerank before searching: the fastest setting whose "
                        "recall (--tune-measure) reaches R on tuning queries with known neighbours "
                        "(--tune-groundtruth), measured through these shard actors; the choice and every "
                        "point measured go to the report")
    p.add_argument("--tune-groundtruth", default=None, metavar="URI",
                   help="ground truth of the tuning queries (ivecs or big-ann format); needed by --target-recall")
    p.add_argument("--tune-queries", default=None, metavar="URI",
                   help="tuning queries (default: the first --tune-sample of --queries)")
    p.add_argument("--tune-measure", default="R@10", metavar="M",
                   help="R@j (the true nearest neighbour among the first j results) or j-recall@j (default R@10)")
    p.add_argument("--tune-sample", type=count(1, 10_000_000), default=1000, help="tuning queries used (default 1000)")
    p.add_argument("--out", required=True, help="results URI (big-ann k-NN format; also OUT.parquet and OUT.report.json; "
                        "ids beyond int32 only in OUT.parquet)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (vectors, queries, actors and their memory, time from the cost model) and "
                        "check it against the cluster (or this machine); search nothing")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import check_plan, format_plan, plan_search, search_files

        params = dict(k=a.k, nprobe=a.nprobe, shortlist=a.shortlist, rerank=0 if a.no_rerank else a.rerank,
                      pairwise=a.pairwise_shortlist, prefix_steps=a.prefix_steps,
                      prefix_shortlist=a.prefix_shortlist, probe_ratio=a.probe_ratio, workers=a.workers,
                      cpus_per_worker=a.cpus_per_worker, memory_per_actor=a.memory_per_actor, version=a.version,
                      max_queries=a.max_queries, vector_column=a.vector_column)
        if a.dry_run:
            plan = plan_search(a.index, a.queries, **params)
            print(format_plan(plan))
            check_plan(plan)
            return 0
        report = search_files(
            a.index, a.queries, a.out, **params, rerank_precision=a.rerank_precision, query_batch=a.query_batch,
            allow_partial=a.allow_partial, lut_scales=not a.no_lut_scales, mmap_dir=a.mmap_dir,
            target_recall=a.target_recall, tune_groundtruth=a.tune_groundtruth, tune_queries=a.tune_queries,
            tune_measure=a.tune_measure, tune_sample=a.tune_sample)
        tuned = ("search_params",) if a.target_recall is not None else ()
        _print_json(report, ("version", "queries", "queries_per_s", "failed_shards", *tuned))
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- serve
@command
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a warm search service over HTTP: shards loaded once, new versions swapped in",
                       description="Shard actors load the index once and answer POST /search requests (JSON: "
                                   '{"queries": [[...]], "k": 10, "nprobe": 16, ...}) until SIGINT or SIGTERM; '
                                   "GET /stats gives p50/p99 latency and queries/s. When CURRENT names a new "
                                   "version it is loaded beside the served one and swapped in without failing a "
                                   "request.")
    p.add_argument("--index", required=True, help="index URI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=count(0, 65535), default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--version", default=None, help="serve this version and never swap (default: follow CURRENT)")
    p.add_argument("--poll-s", type=real(0.05, 86400), default=5.0, help="seconds between reads of CURRENT (default 5)")
    p.add_argument("--k", type=NEIGHBOURS, default=10, help="default neighbours per query (a request may say)")
    p.add_argument("--nprobe", type=count(1, 2**24), default=16, help="default lists probed (a request may say)")
    p.add_argument("--shortlist", type=CANDIDATES, default=100, help="default shortlist (a request may say)")
    p.add_argument("--rerank", type=count(0, 10_000_000), default=None, help="default re-ranked candidates")
    p.add_argument("--rerank-precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--workers", type=WORKERS, default=2, help="shard actors (default 2)")
    p.add_argument("--cpus-per-worker", type=CPUS, default=None,
                   help="CPUs each actor reserves (default: 1, or less so that all actors fit on the cluster, "
                        "twice over when following CURRENT: a swap loads the new version's actors beside "
                        "the served ones, and is refused when the cluster cannot place them)")
    p.add_argument("--memory-per-actor", type=ByteSize(64 << 20, 1 << 42), default=None,
                   help="memory each shard actor may use (e.g. 8G): shards are placed to fit it")
    p.add_argument("--report-s", type=real(0.1, 86400), default=60.0, help="seconds between stats lines (default 60)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import serve

        serve(a.index, host=a.host, port=a.port, k=a.k, nprobe=a.nprobe, shortlist=a.shortlist, rerank=a.rerank,
              workers=a.workers, cpus_per_worker=a.cpus_per_worker, version=a.version, poll_s=a.poll_s,
              rerank_precision=a.rerank_precision, memory_per_actor=a.memory_per_actor, report_s=a.report_s,
              echo=_echo)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- eval
@command
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="recall@1/10/100 of a results file against ground truth")
    p.add_argument("--results", required=True, help="results URI (big-ann k-NN format, or its .parquet copy)")
    p.add_argument("--groundtruth", required=True, help="ground truth (ivecs or big-ann format)")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import evaluate

        _print_json(evaluate(a.results, a.groundtruth))
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- reencode
@command
def _add_reencode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reencode", help="new index version: re-encode with a new model, or add vector files",
                       description="Build a new version of an index on Ray and switch CURRENT to it once it is "
                                   "complete. --model re-encodes every input of the current version with a new "
                                   "model; --add encodes new files (ids continue after the existing ones) and "
                                   "reuses the existing shards. Re-run the same command to resume after a "
                                   "failure. --keep N then deletes all but the last N versions.")
    p.add_argument("--index", required=True, help="index URI (written by `qinco encode`)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", default=None, help="new model directory (local or s3://)")
    what.add_argument("--add", nargs="+", default=None, metavar="URI", help="vector files to add to the index")
    p.add_argument("--keep", type=count(1, 10**6), default=None, help="keep the last N versions, delete older ones")
    p.add_argument("--workers", type=WORKERS, default=2, help="encoder actors (default 2)")
    p.add_argument("--cpus-per-worker", type=CPUS, default=None,
                   help="CPUs each actor reserves (default: 1, or less so that all actors fit on the cluster)")
    p.add_argument("--gpus-per-worker", type=GPUS, default=0.0)
    p.add_argument("--batch-size", type=BATCH, default=None, help="encoder batch size (default: sized from B and A)")
    p.add_argument("--shard-rows", type=count(1, 2**31 - 1), default=None,
                   help="vectors per shard with --model (default: the current version's)")
    p.add_argument("--fmt", default=None, help="format of the added files when the extension does not tell")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import reencode

        report = reencode(a.index, model=a.model, add=a.add, keep=a.keep, workers=a.workers,
                          cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                          batch_size=a.batch_size, shard_rows=a.shard_rows, fmt=a.fmt)
        _print_json(report, ("status", "mode", "parent_version", "version", "vectors", "shards",
                             "shards_encoded_this_run", "shards_reused_this_run", "vectors_per_s", "wall_s",
                             "deleted_versions"))
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- report
@command
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="history of an index: versions, models, sizes, recall")
    p.add_argument("index", help="index URI")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(a: argparse.Namespace) -> int:
        import json

        from pipeline.api import format_report, index_report

        rep = index_report(a.index)
        print(json.dumps(rep, indent=2, sort_keys=True, default=str) if a.json else format_report(rep))
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- maintenance
@command
def _add_rollback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help="point CURRENT at another committed version (e.g. past a damaged one)")
    p.add_argument("index", help="index URI")
    p.add_argument("--to", required=True, metavar="VERSION", help="committed version, e.g. v000003")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import rollback

        r = rollback(a.index, a.to)
        print(f"CURRENT: {r['from'] or '(unreadable)'} -> {r['to']}")
        return 0

    p.set_defaults(func=run)


@command
def _add_gc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="delete all but the last N committed versions (CURRENT is always kept)")
    p.add_argument("index", help="index URI")
    p.add_argument("--keep", type=count(1, 10**6), required=True, help="versions to keep, CURRENT included")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import collect_garbage

        r = collect_garbage(a.index, a.keep)
        print(f"deleted: {', '.join(r['deleted']) or '(none)'}; kept: {', '.join(r['kept'])}")
        return 0

    p.set_defaults(func=run)


@command
def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="read every shard of a version and check it against the manifest "
                                      "(exit status 2 if any is damaged)")
    p.add_argument("index", help="index URI")
    p.add_argument("--version", default=None, help="version to check (default: CURRENT)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(a: argparse.Namespace) -> int:
        from pipeline.api import verify

        r = verify(a.index, a.version)
        if a.json:
            _print_json(r)
        else:
            for s in r["shards"]:
                if not s["ok"]:
                    print(f"DAMAGED {s['name']}: {s['problem']}")
            print(f"{r['index']} {r['version']}: {len(r['shards']) - r['damaged']} of {len(r['shards'])} "
                  f"shards intact, {r['rows']:,} vectors")
        return 2 if r["damaged"] else 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qinco",
        description="QINCo neural vector compression pipeline: train, encode, search.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.api import setup_logging

    setup_logging(args.verbose)  # debug lines of botocore and others carry signed request headers: redacted
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - a PipelineError inside anything is the user's error
        err = find_pipeline_error(e)
        if err is None:
            raise
        logging.getLogger("pipeline.cli").debug("where the error was raised", exc_info=True)
        one_line = " ".join(str(err).split())
        print(f"qinco {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qinco {args.command}: interrupted", file=sys.stderr)
        return 130
