"""Manifests, the CURRENT pointer, versions and garbage collection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.io import storage
from pipeline.errors import ConfigError
from pipeline.index.manifest import (
    code_params, commit_manifest, current_version, garbage_collect, InputEntry, list_versions,
    load_manifest, Manifest, next_version, shard_uri, ShardEntry, validate_manifest, version_dir,
)
from pipeline.errors import ManifestError
from pipeline.index.shards import read_shard, shard_name, write_shard

M, K, NLIST = 4, 256, 8


def _build(index_uri: str, version: str, counts=(25, 10), shard_rows=10, seed=0,
           options=None) -> Manifest:
    """Write real shards for inputs of ``counts`` rows and return the (uncommitted) manifest."""
    rng = np.random.default_rng(seed)
    inputs, shards, id0 = [], [], 0
    for fi, n in enumerate(counts):
        inputs.append(InputEntry(uri=f"s3://data/part{fi}.fvecs", fmt="fvecs", count=n, dim=16,
                                 dtype="float32", id_start=id0, id_stop=id0 + n,
                                 header_sha256=f"{fi:064x}"))
        for start in range(0, n, shard_rows):
            rows = min(shard_rows, n - start)
            ids = np.arange(id0 + start, id0 + start + rows)
            info = write_shard(
                storage.join(version_dir(index_uri, version), "shards", shard_name(fi, start)),
                rng.integers(0, NLIST, rows), ids, rng.integers(0, K, (rows, M)), K=K, nlist=NLIST,
                model_sha="model-sha", options=options)
            shards.append(ShardEntry.from_info(info, fi, start))
        id0 += n
    return Manifest.create(version, model={"uri": "s3://m/model.safetensors", "sha256": "model-sha",
                                           "config": {"M": M, "K": K}},
                           code=code_params(M, K, NLIST), inputs=inputs, shards=shards,
                           job_config={"shard_rows": shard_rows})


def test_manifest_json_round_trip_rebuilds_nested_entries(tmp_path):
    m = _build(str(tmp_path), "v000001")
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert isinstance(back.inputs[1], InputEntry) and isinstance(back.shards[0], ShardEntry)
    assert back.total_rows == 35 and len(back.shards) == 4
    with pytest.raises(ConfigError, match="unknown"):
        Manifest.from_dict({**m.to_dict(), "extra": 1})
    d = m.to_dict()
    d["shards"][0]["typo"] = 1
    with pytest.raises(ConfigError, match="typo"):
        Manifest.from_dict(d)
    with pytest.raises(ConfigError, match="format_version"):
        Manifest.from_dict({**m.to_dict(), "format_version": 99})


def test_commit_then_current_and_read_back(tmp_path):
    idx = str(tmp_path / "idx")
    assert current_version(idx) is None and list_versions(idx) == []
    with pytest.raises(ManifestError, match="no committed"):
        load_manifest(idx)
    v = next_version(idx)
    assert v == "v000001"
    m = _build(idx, v)
    # shards written, nothing committed yet: invisible to readers
    assert current_version(idx) is None and list_versions(idx) == []
    assert next_version(idx) == "v000002"  # an uncommitted directory still takes its number
    muri = commit_manifest(idx, m)
    assert muri == str(tmp_path / "idx/versions/v000001/manifest.json")
    cur = json.loads((tmp_path / "idx" / "CURRENT").read_text())
    assert cur["version"] == v and cur["manifest"] == "versions/v000001/manifest.json"
    assert load_manifest(idx) == m and list_versions(idx) == [v]
    for s in m.shards:
        sh = read_shard(shard_uri(idx, v, s), expected=s.info(), nlist=NLIST)
        assert sh.ids_N.min() == s.id_min and sh.ids_N.max() == s.id_max

    m2 = _build(idx, "v000002", seed=1).replace(parent_version=v)
    commit_manifest(idx, m2, switch_current=False)
    assert current_version(idx) == v and list_versions(idx) == [v, "v000002"]
    assert load_manifest(idx, "v000002") == m2
    commit_manifest(idx, m2)  # same content again: only switches the pointer
    assert current_version(idx) == "v000002"


def test_commit_refuses_missing_shards_and_keeps_current(tmp_path):
    idx = str(tmp_path)
    commit_manifest(idx, _build(idx, "v000001"))
    m = _build(idx, "v000002")
    storage.remove(shard_uri(idx, "v000002", m.shards[2]))
    with pytest.raises(ConfigError, match="missing"):
        commit_manifest(idx, m)
    assert current_version(idx) == "v000001" and list_versions(idx) == ["v000001"]
    assert not (tmp_path / "versions/v000002/manifest.json").exists()


def test_different_manifest_for_committed_version_refused(tmp_path):
    idx = str(tmp_path)
    m = _build(idx, "v000001")
    commit_manifest(idx, m)
    before = (tmp_path / "versions/v000001/manifest.json").read_bytes()
    commit_manifest(idx, m.replace(created="2000-01-01T00:00:00Z"))  # a re-run of the same commit
    other = m.replace(job_config={"shard_rows": 99})
    with pytest.raises(ConfigError, match="different content"):
        commit_manifest(idx, other)
    assert (tmp_path / "versions/v000001/manifest.json").read_bytes() == before


def test_gc_keeps_n_and_never_current(tmp_path):
    idx = str(tmp_path)
    for i in range(1, 6):
        commit_manifest(idx, _build(idx, f"v{i:06d}", counts=(5,), shard_rows=5, seed=i))
    # an uncommitted directory newer than every commit (a running or resumable job)
    storage.write_bytes_atomic(storage.join(idx, "versions/v000007/shards/junk"), b"in progress")
    storage.write_bytes_atomic(storage.join(idx, "versions/notes.txt"), b"not a version")
    from pipeline.index.manifest import set_current

    set_current(idx, "v000002")  # rolled back: CURRENT is old
    deleted = garbage_collect(idx, keep=3)
    assert deleted == ["v000001", "v000003"]
    assert list_versions(idx) == ["v000002", "v000004", "v000005"]
    assert current_version(idx) == "v000002"
    assert (tmp_path / "versions/v000007/shards/junk").exists()  # newer than newest commit: kept
    assert not (tmp_path / "versions/v000001").exists()
    assert (tmp_path / "versions/notes.txt").exists()

    set_current(idx, "v000005")
    commit_manifest(idx, _build(idx, "v000008", counts=(5,), shard_rows=5), switch_current=False)
    # v000007 is now older than the newest committed version: abandoned
    assert garbage_collect(idx, keep=1) == ["v000002", "v000004", "v000007", "v000008"]
    assert list_versions(idx) == ["v000005"] and current_version(idx) == "v000005"
    assert load_manifest(idx).version == "v000005"
    with pytest.raises(ConfigError):
        garbage_collect(idx, keep=0)


def _manifest_with(shards, inputs=None) -> Manifest:
    inputs = inputs or [InputEntry("a", "fvecs", 20, 4, "float32", 0, 20, "0"),
                        InputEntry("b", "fvecs", 10, 4, "float32", 20, 30, "1")]
    entries = [ShardEntry(f"shards/{shard_name(fi, fr)}", rows, 100, "0" * 64, fi, fr,
                          inputs[fi].id_start + fr, inputs[fi].id_start + fr + rows - 1, 1)
               for fi, fr, rows in shards]
    return Manifest.create("v000001", model={}, code=code_params(4, 256, 8), inputs=inputs,
                           shards=entries, job_config={})


def test_validate_manifest_catches_id_range_problems():
    validate_manifest(_manifest_with([(0, 0, 10), (0, 10, 10), (1, 0, 10)]))
    with pytest.raises(ConfigError, match="overlapping ids"):
        validate_manifest(_manifest_with([(0, 0, 10), (0, 5, 15), (1, 0, 10)]))
    with pytest.raises(ConfigError, match=r"cover 10 of 20 rows; first missing id 10"):
        validate_manifest(_manifest_with([(0, 0, 10), (1, 0, 10)]))
    validate_manifest(_manifest_with([(0, 0, 10), (1, 0, 10)]), require_complete=False)
    with pytest.raises(ConfigError, match="run past"):
        validate_manifest(_manifest_with([(0, 0, 10), (0, 10, 11), (1, 0, 10)]))
    m = _manifest_with([(0, 0, 10), (0, 10, 10), (1, 0, 10)])
    with pytest.raises(ConfigError, match="total_rows"):
        validate_manifest(m.replace(total_rows=31))
    m.shards[2].id_min += 1
    with pytest.raises(ConfigError, match="contiguous"):
        validate_manifest(m)
    overlapping_inputs = [InputEntry("a", "fvecs", 20, 4, "float32", 0, 20, "0"),
                          InputEntry("b", "fvecs", 10, 4, "float32", 15, 25, "1")]
    with pytest.raises(ConfigError, match="overlapping id ranges"):
        validate_manifest(_manifest_with([(0, 0, 20), (1, 0, 10)], overlapping_inputs))
    bad_count = [InputEntry("a", "fvecs", 20, 4, "float32", 0, 21, "0")]
    with pytest.raises(ConfigError, match="does not hold count"):
        validate_manifest(_manifest_with([(0, 0, 20)], bad_count))
    m = _manifest_with([(0, 0, 10), (0, 10, 10), (1, 0, 10)])
    with pytest.raises(ConfigError, match="code dict"):
        validate_manifest(m.replace(code={**m.code, "code_dtype": "uint16"}))


@pytest.mark.s3
def test_s3_round_trip_commit_read_gc(s3):
    idx = storage.join(s3.bucket("index-format"), "idx")
    opts = s3.options()
    for v in ("v000001", "v000002"):
        m = _build(idx, v, counts=(12,), shard_rows=5, options=opts)
        commit_manifest(idx, m, options=opts)
    assert list_versions(idx, opts) == ["v000001", "v000002"]
    assert current_version(idx, opts) == "v000002" and next_version(idx, opts) == "v000003"
    back = load_manifest(idx, options=opts)
    assert back == m
    for s in back.shards:
        sh = read_shard(shard_uri(idx, "v000002", s), expected=s.info(), options=opts, nlist=NLIST)
        assert len(sh) == s.rows and sh.list_offsets[-1] == s.rows
    assert garbage_collect(idx, keep=1, options=opts) == ["v000001"]
    assert list_versions(idx, opts) == ["v000002"]
    assert storage.list_files(version_dir(idx, "v000001"), opts) == []
