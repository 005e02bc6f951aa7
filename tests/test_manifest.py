"""Manifests, the CURRENT pointer, versions and garbage collection."""

from __future__ import annotations

import os

import json

import numpy as np
import pytest

from pipeline.io import storage
from pipeline.errors import ConfigError
from pipeline.index.manifest import (
    code_params, commit_manifest, current_version, garbage_collect, InputEntry, list_versions,
    load_manifest, Manifest, manifest_uri, next_version, shard_uri, ShardEntry, validate_manifest, version_dir,
)
from pipeline.errors import CorruptShardError, ManifestError
from pipeline.index.shards import load_shard_rows, read_shard, shard_name, write_shard

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

    set_current(idx, "v000002", allow_older=True)  # rolled back: CURRENT is old
    deleted = garbage_collect(idx, keep=3)
    assert deleted == ["v000001", "v000003"]
    assert list_versions(idx) == ["v000002", "v000004", "v000005"]
    assert current_version(idx) == "v000002"
    assert (tmp_path / "versions/v000007/shards/junk").exists()  # newer than newest commit: kept
    assert not (tmp_path / "versions/v000001").exists()
    assert (tmp_path / "versions/notes.txt").exists()

    set_current(idx, "v000005")
    commit_manifest(idx, _build(idx, "v000008", counts=(5,), shard_rows=5), switch_current=False)
    # v000007 is now older than the newest committed version, but was written a moment ago: a job
    # that lost the race may still be writing there (its re-run reuses the shards)
    assert garbage_collect(idx, keep=3) == ["v000002"]
    assert (tmp_path / "versions/v000007/shards/junk").exists()
    old = os.stat(tmp_path / "versions/v000007/shards/junk").st_mtime - 3700
    os.utime(tmp_path / "versions/v000007/shards/junk", (old, old))  # untouched for over an hour: abandoned
    assert garbage_collect(idx, keep=1) == ["v000004", "v000007", "v000008"]
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
    with pytest.raises(ConfigError, match=r"overlap: rows \[0, 10\) and \[5, 20\)"):
        validate_manifest(_manifest_with([(0, 0, 10), (0, 5, 15), (1, 0, 10)]))
    with pytest.raises(ConfigError, match=r"cover 10 of 20 rows; first missing row 10"):
        validate_manifest(_manifest_with([(0, 0, 10), (1, 0, 10)]))
    validate_manifest(_manifest_with([(0, 0, 10), (1, 0, 10)]), require_complete=False)
    with pytest.raises(ConfigError, match="outside input 0's 20 rows"):
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


def _escape(idx: str, options=None) -> str:
    """Commit a version, then rewrite its manifest so a shard's name leaves the version
    directory toward a real file; returns the hostile name."""
    m = _build(idx, "v000001", counts=(12,), shard_rows=5, options=options)
    commit_manifest(idx, m, options=options)
    outside = storage.join(idx, "outside.parquet")
    storage.copy_file(shard_uri(idx, "v000001", m.shards[0]), outside, options)
    d = m.to_dict()
    d["shards"][0]["name"] = "../../outside.parquet"
    storage.write_bytes_atomic(storage.join(version_dir(idx, "v000001"), "manifest.json"),
                               json.dumps(d).encode(), options)
    return d["shards"][0]["name"]


def _refuses_escape(idx: str, name: str, options=None) -> None:
    with pytest.raises(ManifestError, match=r"manifest.json: invalid manifest: shard .../../outside.parquet.: the name must be shards/shard-f00000"):
        load_manifest(idx, options=options)
    entry = {**_build(idx, "v000009", counts=(5,), options=options).shards[0].to_dict(), "name": name}
    with pytest.raises(CorruptShardError, match="outside.parquet"):
        load_shard_rows(version_dir(idx, "v000001"), [entry], NLIST, M, options=options)
    errors: dict = {}  # the tolerant loader records it and still never opens the file
    load_shard_rows(version_dir(idx, "v000001"), [entry], NLIST, M, options=options, errors=errors)
    assert "not of the form" in errors[name]


def test_manifest_naming_a_path_outside_the_version_is_refused(tmp_path):
    idx = str(tmp_path / "idx")
    _refuses_escape(idx, _escape(idx))


@pytest.mark.s3
def test_manifest_path_escape_refused_on_s3(s3):
    idx = storage.join(s3.bucket("index-escape"), "idx")
    opts = s3.options()
    _refuses_escape(idx, _escape(idx, opts), opts)


def test_verify_gc_rollback_and_report_from_the_cli(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.index.history import read_history

    idx = str(tmp_path / "idx")
    assert main(["report", idx]) == 2  # no index there: an error, not an empty table
    assert "no index there" in capsys.readouterr().err
    for v in ("v000001", "v000002", "v000003"):
        commit_manifest(idx, _build(idx, v, seed=int(v[-1])))
    assert main(["verify", idx]) == 0
    assert "4 of 4 shards intact, 35 vectors" in capsys.readouterr().out
    m = load_manifest(idx)
    bad = tmp_path / "idx/versions/v000003" / m.shards[1].name
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    assert main(["verify", idx]) == 2
    out = capsys.readouterr().out
    assert f"DAMAGED {m.shards[1].name}" in out and "3 of 4 shards intact" in out
    assert main(["verify", idx, "--version", "v000002"]) == 0

    assert main(["rollback", idx, "--to", "v000009"]) == 2
    assert "not committed" in capsys.readouterr().err
    assert main(["rollback", idx, "--to", "v000002"]) == 0
    assert current_version(idx) == "v000002"
    assert [e["body"] for e in read_history(idx) if e["kind"] == "rollback"] == [
        {"from": "v000003", "to": "v000002", "vectors": 35}]
    assert main(["gc", idx, "--keep", "1"]) == 0  # CURRENT (v000002) is the one kept
    assert list_versions(idx) == ["v000002"] and "deleted: v000001, v000003" in capsys.readouterr().out


def test_a_damaged_current_version_is_shown_and_rolled_back_past(tmp_path, capsys):
    from pipeline.cli import main

    idx = str(tmp_path / "idx")
    commit_manifest(idx, _build(idx, "v000001"))
    commit_manifest(idx, _build(idx, "v000002", seed=2))
    muri = tmp_path / "idx/versions/v000002/manifest.json"
    muri.write_bytes(muri.read_bytes()[:300])  # truncated
    with pytest.raises(ManifestError, match="v000002/manifest.json: not valid JSON"):
        load_manifest(idx)
    assert main(["report", idx]) == 0
    assert "v000002 is damaged" in capsys.readouterr().out
    assert main(["rollback", idx, "--to", "v000002"]) == 2  # a damaged target is refused
    assert main(["rollback", idx, "--to", "v000001"]) == 0
    assert current_version(idx) == "v000001" and load_manifest(idx).version == "v000001"
    (tmp_path / "idx/CURRENT").write_text("{trunc")  # even a damaged CURRENT can be rolled back
    assert main(["rollback", idx, "--to", "v000001"]) == 0
    assert "(unreadable) -> v000001" in capsys.readouterr().out and current_version(idx) == "v000001"


@pytest.mark.s3
def test_debug_logging_never_shows_the_credentials(s3, tmp_path):
    """`qinco -v` turns on botocore's debug lines, which print each request's signed headers."""
    import os
    import subprocess
    import sys

    idx = storage.join(s3.bucket("index-logs"), "idx")
    commit_manifest(idx, _build(idx, "v000001", counts=(6,), options=s3.options()), options=s3.options())
    env = dict(os.environ)  # the fixture points the AWS_* variables at the server
    out = subprocess.run([sys.executable, "-m", "pipeline", "-v", "report", idx], capture_output=True,
                         text=True, timeout=120, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    assert "Credential=***" in text  # the signed headers were logged, redacted
    assert env["AWS_ACCESS_KEY_ID"] not in text and env["AWS_SECRET_ACCESS_KEY"] not in text


def _two_writers(idx: str, options=None) -> None:
    from pipeline.errors import ConcurrentWriterError
    from pipeline.index.manifest import set_current

    first = _build(idx, "v000001", counts=(12,), shard_rows=5, options=options)
    second = _build(idx, "v000002", counts=(7,), shard_rows=5, seed=2, options=options)
    commit_manifest(idx, second, options=options)  # the later job finishes first
    with pytest.raises(ConcurrentWriterError, match="CURRENT names v000002, newer than this job's v000001"):
        commit_manifest(idx, first, options=options)
    assert current_version(idx, options) == "v000002" and list_versions(idx, options) == ["v000002"]
    commit_manifest(idx, first, switch_current=False, options=options)
    with pytest.raises(ConcurrentWriterError, match="newer"):  # CURRENT never moves back by itself
        set_current(idx, "v000001", options)
    assert current_version(idx, options) == "v000002"
    set_current(idx, "v000001", options, allow_older=True)  # what `qinco rollback` does
    assert current_version(idx, options) == "v000001"
    # the same version committed by another job with other content is refused
    other = _build(idx, "v000003", counts=(7,), shard_rows=5, seed=3, options=options)
    storage.write_bytes_atomic(manifest_uri(idx, "v000003"), (other.to_json() + "\n").encode(), options)
    with pytest.raises(ConfigError, match="different content"):
        commit_manifest(idx, other.replace(job_config={"shard_rows": 6}), options=options)


def test_two_writers_never_move_current_back(tmp_path):
    _two_writers(str(tmp_path / "idx"))


@pytest.mark.s3
def test_two_writers_never_move_current_back_on_s3(s3):
    _two_writers(storage.join(s3.bucket("two-writers"), "idx"), s3.options())


def _synthetic_version(idx: str, version: str, n_shards: int, rows: int = 1000) -> Manifest:
    """A manifest of ``n_shards`` shards over one input, with empty files in their place
    (commit checks that shards exist by one listing; readers check their contents)."""
    inputs = [InputEntry("s3://data/big.u8bin", "u8bin", n_shards * rows, 128, "uint8", 0, n_shards * rows,
                         "0" * 64)]
    shards = []
    shard_dir = os.path.join(idx, "versions", version, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    for i in range(n_shards):
        name = shard_name(0, i * rows)
        open(os.path.join(shard_dir, name), "wb").close()
        shards.append(ShardEntry(f"shards/{name}", rows, 20000, f"{i:064x}", 0, i * rows, i * rows,
                                 i * rows + rows - 1, 64))
    return Manifest.create(version, model={"uri": "m", "sha256": "s", "config": {}},
                           code=code_params(16, 256, 65536), inputs=inputs, shards=shards, job_config={})


def test_commit_and_load_cost_grows_linearly_with_shards(tmp_path, monkeypatch):
    """20,000 shards: the same number of storage requests as 2,000 (none per shard), and time
    within a generous multiple of linear."""
    import time

    calls = {"n": 0}
    for name in ("exists", "read_bytes", "list_files", "file_size", "create_exclusive", "read_tagged",
                 "replace_if_unchanged", "write_bytes_atomic"):
        real = getattr(storage, name)

        def counted(*a, _real=real, **kw):
            calls["n"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(storage, name, counted)
    seconds, requests = {}, {}
    for n in (2000, 20000):
        idx = str(tmp_path / f"idx{n}")
        m = _synthetic_version(idx, "v000001", n)
        calls["n"] = 0
        t0 = time.perf_counter()
        commit_manifest(idx, m)
        back = load_manifest(idx)
        seconds[n] = time.perf_counter() - t0
        requests[n] = calls["n"]
        assert len(back.shards) == n and back.total_rows == n * 1000
    assert requests[20000] == requests[2000], requests
    assert seconds[20000] <= 30 * max(seconds[2000], 0.05), seconds


def test_shards_merged_on_disk_equal_the_in_memory_merge(tmp_path):
    """``load_shard_rows(mmap_dir=...)`` gives exactly the in-memory arrays, as read-only memory
    maps, for shards whose ids follow each other and for shards whose ids interleave (user ids),
    with and without stored row scales; a corrupt shard is skipped the same way."""
    rng = np.random.default_rng(4)
    vdir = str(tmp_path / "v")
    entries = []
    for i, n in enumerate((40, 1, 33, 25)):
        ids = np.arange(i * 100, i * 100 + n) if i < 2 else rng.choice(10**6, n, replace=False)
        scale = rng.random(n).astype(np.float16) if i % 2 else None
        info = write_shard(storage.join(vdir, "shards", shard_name(0, i * 100)), rng.integers(0, NLIST, n), ids,
                           rng.integers(0, K, (n, M)), K=K, nlist=NLIST, model_sha="m", lut_scale_N=scale)
        entries.append(ShardEntry.from_info(info, 0, i * 100).to_dict())
    want = load_shard_rows(vdir, entries, NLIST, M)
    got = load_shard_rows(vdir, entries, NLIST, M, mmap_dir=str(tmp_path / "mm"))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
        assert w.dtype == g.dtype
    assert all(isinstance(g, np.memmap) and not g.flags.writeable for i, g in enumerate(got) if i != 3)
    assert sorted(os.listdir(tmp_path / "mm")) == ["codes.npy", "ids.npy", "list_ids.npy", "scale.npy"]
    bad = dict(entries[2], sha256="0" * 64)
    errors: dict = {}
    got = load_shard_rows(vdir, [entries[0], bad, entries[3]], NLIST, M, errors=errors, mmap_dir=str(tmp_path / "mm2"))
    want = load_shard_rows(vdir, [entries[0], entries[3]], NLIST, M)
    assert list(errors) == [bad["name"]]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
