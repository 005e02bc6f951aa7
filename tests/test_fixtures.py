"""An index and a model written by an earlier release are read, searched and decoded by today's
code with the results that release gave (``tests/fixtures/written-by-0.1.0/README.md``)."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.io import results
from pipeline.io import vectors

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "written-by-0.1.0"


@pytest.fixture
def old_files(tmp_path, monkeypatch):
    """A copy of the fixture (its manifest names the model and the input by relative paths)."""
    work = tmp_path / "old"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    return work


def test_old_index_searches_to_the_results_it_gave(old_files, ray_session):
    rc = main(["search", "--index", "index", "--queries", "queries.fvecs", "--out", "now.ivecs", "--k", "5",
               "--nprobe", "2", "--shortlist", "20", "--workers", "1"])
    assert rc == 0
    I_now, D_now = results.read_knn_results("now.ivecs")
    I_then, D_then = results.read_knn_results("results.ivecs")
    assert I_now.shape == (40, 5)
    np.testing.assert_array_equal(I_now, I_then)
    # Distances are float64 sums of the decoder's float32 output: equal up to the last bits that
    # another CPU's kernels may change.
    np.testing.assert_allclose(D_now, D_then, rtol=1e-5)


def test_old_codes_file_decodes_to_the_vectors_it_gave(old_files):
    assert main(["decode", "--model", "model", "--codes", "codes.parquet", "--out", "now.fvecs"]) == 0
    now = vectors.read_vectors("now.fvecs")
    then = vectors.read_vectors("decoded.fvecs")
    assert now.shape == (500, 8)
    np.testing.assert_allclose(now, then, rtol=1e-5, atol=1e-6)


def test_old_index_reports_and_its_manifest_verifies(old_files, capsys):
    from pipeline.index.manifest import load_manifest, validate_manifest
    from pipeline.index.shards import read_shard

    m = load_manifest("index")
    validate_manifest(m)
    assert m.version == "v000001" and sum(s.rows for s in m.shards) == 500
    for s in m.shards:
        sh = read_shard(f"index/versions/v000001/{s.name}", expected=s.info(), nlist=4)
        assert len(sh) == s.rows
    assert main(["report", "index", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["current"] == "v000001"
