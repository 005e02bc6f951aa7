"""Inputs as users have them: folders and glob patterns, expanded in a deterministic order."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.io import storage, vectors
from pipeline.io.inputs import expand_inputs, plan_inputs


def _tree(root):
    """b.fvecs, a.fvecs (with an ids file), sub/c.npy, sub/deeper/d.fvecs, and files that are not
    inputs: a marker, a hidden file, a text file."""
    rng = np.random.default_rng(0)
    sizes = {"b.fvecs": 3, "a.fvecs": 5, "sub/c.npy": 4, "sub/deeper/d.fvecs": 2}
    for name, n in sizes.items():
        vectors.write_vectors(storage.join(root, name), rng.normal(size=(n, 4)).astype(np.float32))
    np.save(str(root / "a.fvecs.ids.npy") if not isinstance(root, str) else root + "/a.fvecs.ids.npy",
            np.arange(100, 105, dtype=np.int64))
    for name in ("_SUCCESS", ".hidden.fvecs", "notes.txt"):
        storage.write_bytes_atomic(storage.join(root, name), b"x")
    return sizes


def test_folders_and_patterns_expand_sorted_in_argument_order(tmp_path):
    _tree(tmp_path)
    r = str(tmp_path)
    assert expand_inputs([r]) == [f"{r}/a.fvecs", f"{r}/b.fvecs", f"{r}/sub/c.npy", f"{r}/sub/deeper/d.fvecs"]
    assert expand_inputs([f"{r}/*.fvecs"]) == [f"{r}/a.fvecs", f"{r}/b.fvecs"]
    assert expand_inputs([f"{r}/**/*.fvecs"]) == [f"{r}/a.fvecs", f"{r}/b.fvecs", f"{r}/sub/deeper/d.fvecs"]
    assert expand_inputs([f"{r}/sub/*", f"{r}/[b]*.fvecs"]) == [f"{r}/sub/c.npy", f"{r}/b.fvecs"]
    # files stand for themselves, in the order given
    assert expand_inputs([f"{r}/b.fvecs", f"{r}/a.fvecs"]) == [f"{r}/b.fvecs", f"{r}/a.fvecs"]


def test_planned_ids_follow_the_expanded_order(tmp_path):
    _tree(tmp_path)
    r = str(tmp_path)
    (tmp_path / "a.fvecs.ids.npy").unlink()  # all files number their rows (none brings ids)
    planned = plan_inputs([f"{r}/**/*.fvecs", f"{r}/sub/c.npy"])
    assert [(p.uri, p.id_start, p.id_stop) for p in planned] == [
        (f"{r}/a.fvecs", 0, 5), (f"{r}/b.fvecs", 5, 8), (f"{r}/sub/deeper/d.fvecs", 8, 10), (f"{r}/sub/c.npy", 10, 14)]
    with pytest.raises(ConfigError, match="listed twice"):
        plan_inputs([r, f"{r}/b.fvecs"])


def test_patterns_and_folders_without_vector_files_are_refused_by_name(tmp_path):
    _tree(tmp_path)
    r = str(tmp_path)
    with pytest.raises(ConfigError, match=r"\*\.parquet: the pattern matches no vector file"):
        expand_inputs([f"{r}/*.parquet"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="empty: the folder holds no vector file"):
        expand_inputs([f"{r}/empty"])
    # with the format given, files without a vector extension under a folder are inputs too
    assert expand_inputs([f"{r}/empty"], fmt="fvecs") == [f"{r}/empty/readme.txt"]


@pytest.mark.s3
def test_s3_prefixes_and_patterns(s3):
    base = s3.bucket("expand") + "/emb"
    rng = np.random.default_rng(1)
    for name in ("part-2.npy", "part-10.npy", "part-1.npy", "x/part-3.npy"):
        vectors.write_vectors(f"{base}/{name}", rng.normal(size=(2, 4)).astype(np.float32))
    storage.write_bytes_atomic(f"{base}/_SUCCESS", b"")
    assert expand_inputs([f"{base}/*.npy"]) == [f"{base}/part-1.npy", f"{base}/part-10.npy", f"{base}/part-2.npy"]
    assert expand_inputs([base + "/"]) == [f"{base}/part-1.npy", f"{base}/part-10.npy", f"{base}/part-2.npy",
                                           f"{base}/x/part-3.npy"]
    assert [p.id_start for p in plan_inputs([f"{base}/**/part-*.npy"])] == [0, 2, 4, 6]
