"""Parquet inputs with their own column names (--vector-column / --id-column): planned, read,
encoded and searched with the ids of the named column, recorded in the manifest, and refused
with the column named when it is missing; parquet queries read from a named column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.api import open_index
from pipeline.cli import main
from pipeline.errors import VectorFormatError
from pipeline.index.manifest import load_manifest
from pipeline.io import ids as ids_mod
from pipeline.io.inputs import plan_inputs
from pipeline.io import results, vectors
from pipeline.stages.encode import EncodeJobConfig, run_encode


def _write(path, x, doc_ids):
    """A dump as embedding jobs write it: variable-length float16 lists, string titles, int64 ids."""
    emb = pa.array([row.astype(np.float16) for row in x], type=pa.list_(pa.float16()))
    pq.write_table(pa.table({"title": pa.array([f"doc {i}" for i in doc_ids]), "emb": emb,
                             "doc_id": pa.array(doc_ids, pa.int64())}), path, row_group_size=700)


@pytest.fixture
def dump(tiny_index_inputs, tmp_path):
    x = tiny_index_inputs["x"][:2000]
    doc_ids = 10_000_000_000 + 7 * np.arange(len(x), dtype=np.int64)
    path = str(tmp_path / "dump.parquet")
    _write(path, x, doc_ids)
    return {"path": path, "x": x, "ids": doc_ids}


def test_named_columns_are_planned_and_read(dump):
    with pytest.raises(VectorFormatError, match="no 'vector' column.*--vector-column"):
        plan_inputs([dump["path"]])
    (inp,) = plan_inputs([dump["path"]], vector_column="emb", id_column="doc_id")
    assert (inp.count, inp.dim, inp.dtype, inp.ids) == (2000, 16, "float16", ids_mod.COLUMN)
    assert (inp.vector_column, inp.id_column) == ("emb", "doc_id")
    x = vectors.read_rows(inp.uri, 650, 1450, file_info=inp.file_info())
    np.testing.assert_array_equal(x, dump["x"][650:1450].astype(np.float16))
    np.testing.assert_array_equal(ids_mod.read(inp, 650, 1450, file_info=inp.file_info()), dump["ids"][650:1450])
    # without an id column of that name the rows number the vectors
    (plain,) = plan_inputs([dump["path"]], vector_column="emb")
    assert plain.ids == ids_mod.ROWS


@pytest.mark.ray
def test_encode_and_search_with_named_columns(ray_session, dump, tiny_index_inputs, tmp_path, capsys):
    uri = str(tmp_path / "index")
    run_encode(EncodeJobConfig(model_uri=tiny_index_inputs["model"], data_uris=[dump["path"]], index_uri=uri,
                               workers=1, cpus_per_worker=0.5, shard_rows=900, vector_column="emb",
                               id_column="doc_id"), progress=False)
    m = load_manifest(uri)
    assert (m.inputs[0].vector_column, m.inputs[0].id_column, m.inputs[0].ids) == ("emb", "doc_id", "column")
    _, I = open_index(uri).search(dump["x"][:30].astype(np.float16).astype(np.float32), k=1, nprobe=8,
                                  shortlist=50)
    assert np.isin(I, dump["ids"]).all()  # the ids are the doc_id column's
    assert np.mean(I[:, 0] == dump["ids"][:30]) >= 0.5  # 2-byte codes: most vectors find themselves
    # the command line names them too; a wrong name is one line naming the column
    rc = main(["encode", "--model", tiny_index_inputs["model"], "--data", dump["path"], "--out",
               str(tmp_path / "other"), "--vector-column", "embedding", "--dry-run"])
    assert rc == 2 and "no 'embedding' column" in capsys.readouterr().err
    # queries in the same dump: the query job reads them from the named column
    out = str(tmp_path / "res")
    rc = main(["search", "--index", uri, "--queries", dump["path"], "--vector-column", "emb", "--out", out,
               "--max-queries", "30", "--k", "1", "--nprobe", "8", "--shortlist", "50", "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(results.read_results(out)[0], I)
    rc = main(["search", "--index", uri, "--queries", dump["path"], "--out", str(tmp_path / "res2"), "--dry-run"])
    assert rc == 2 and "no 'vector' column" in capsys.readouterr().err
