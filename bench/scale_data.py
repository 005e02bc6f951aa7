"""SIFT-like uint8 vectors for scale runs, generated deterministically from a seed.

Each vector is a real dwsift base vector (an "anchor", when the dataset is present; otherwise a
synthetic clustered one) plus Gaussian noise, rounded and clipped to [0, 255]. The rows are made
in fixed blocks of ``BLOCK`` rows, block ``b`` from a generator seeded with ``(seed, b)``, so
any row range is the same whatever reads it and in whatever pieces; nothing is stored but the
seed. Queries come from the same anchors with another stream (``QUERY_STREAM``).

    python bench/scale_data.py --n 10000000 --out /tmp/scale/base.u8bin [--seed 0]

writes ``.bvecs``, ``.u8bin`` or ``.parquet`` (by the extension; local path or ``s3://``),
streamed block by block.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import storage, vectors  # noqa: E402

DIM = 128
BLOCK = 65536           # rows per generator block: the unit of determinism
N_ANCHORS = 20000       # real vectors the data is clustered around
NOISE = 12.0            # noise std per coordinate (SIFT coordinates span 0..255)
QUERY_STREAM = 1 << 40  # block numbers of the queries, far from any base block


def anchors(seed: int = 0, data_dir: str | None = None) -> tuple[np.ndarray, str]:
    """``(N_ANCHORS x 128 uint8, source)``: dwsift base vectors when present, else synthetic
    vectors around 256 random centres (the same for a given seed)."""
    d = pathlib.Path(data_dir or os.environ.get("QINCO_DATA_DIR", ROOT.parent / "shared" / "data"))
    path = d / "dwsift" / "base.bvecs"
    if path.exists():
        x = vectors.read_rows(str(path), 0, min(N_ANCHORS, vectors.info(str(path)).count))
        return np.ascontiguousarray(x, dtype=np.uint8), "dwsift"
    rng = np.random.default_rng([seed, 7])
    centres = rng.integers(0, 120, (256, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 256, N_ANCHORS)] + rng.normal(0, 20, (N_ANCHORS, DIM))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), "synthetic"


def block(anchors_AD: np.ndarray, seed: int, b: int) -> np.ndarray:
    """Rows ``[b * BLOCK, (b + 1) * BLOCK)``: a pure function of (anchors, seed, b)."""
    rng = np.random.default_rng([seed, b])
    pick = rng.integers(0, len(anchors_AD), BLOCK)
    x = anchors_AD[pick].astype(np.float32) + rng.normal(0, NOISE, (BLOCK, anchors_AD.shape[1])).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rows(anchors_AD: np.ndarray, seed: int, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the generated collection."""
    out, b = [], start // BLOCK
    while b * BLOCK < stop:
        x = block(anchors_AD, seed, b)
        lo, hi = max(start, b * BLOCK) - b * BLOCK, min(stop, (b + 1) * BLOCK) - b * BLOCK
        out.append(x[lo:hi])
        b += 1
    return np.concatenate(out) if out else np.zeros((0, anchors_AD.shape[1]), np.uint8)


def queries(anchors_AD: np.ndarray, seed: int, n: int) -> np.ndarray:
    """``n`` query vectors (float32), from the anchors on a stream of their own."""
    return rows(anchors_AD, seed, QUERY_STREAM * BLOCK, QUERY_STREAM * BLOCK + n).astype(np.float32)


def write(uri: str, n: int, seed: int = 0, anchors_AD: np.ndarray | None = None, log=print) -> None:
    """Write ``n`` generated rows to ``uri`` (format from the extension), one block at a time."""
    if anchors_AD is None:
        anchors_AD, _ = anchors(seed)
    fmt = vectors.detect_format(uri)
    t0 = time.time()
    if fmt == "parquet":
        schema = pa.schema([("vector", pa.list_(pa.uint8(), DIM))])
        with storage.open_atomic(uri) as f, pq.ParquetWriter(f, schema) as w:
            for s in range(0, n, BLOCK):
                x = rows(anchors_AD, seed, s, min(n, s + BLOCK))
                w.write_table(pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)}))
    elif fmt in ("bvecs", "u8bin"):
        with storage.open_atomic(uri) as f:
            if fmt == "u8bin":
                f.write(np.array([n, DIM], "<u4").tobytes())
            for s in range(0, n, BLOCK):
                x = rows(anchors_AD, seed, s, min(n, s + BLOCK))
                if fmt == "bvecs":
                    rec = np.empty((len(x), 4 + DIM), np.uint8)
                    rec[:, :4] = np.frombuffer(np.int32(DIM).tobytes(), np.uint8)
                    rec[:, 4:] = x
                    x = rec
                f.write(x.tobytes())
    else:
        raise SystemExit(f"{uri}: write .bvecs, .u8bin or .parquet")
    log(f"wrote {n:,} vectors to {storage.redact(uri)} in {time.time() - t0:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write(a.out, a.n, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
