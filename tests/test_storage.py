"""Storage helper: local and real-S3 (SeaweedFS) behaviour, atomicity, error mapping, redaction."""

from __future__ import annotations

import errno
import io
import os
import pickle

import pytest

from pipeline.io import storage
from pipeline.errors import StorageError
from pipeline.io.storage import StorageOptions


def test_options_repr_masks_keys_and_json_roundtrip():
    o = StorageOptions(endpoint_url="http://h:1", access_key="AKIAEXAMPLEKEY", secret_key="s3cr3tvalue")
    text = repr(o) + str(o)
    assert "AKIAEXAMPLEKEY" not in text and "s3cr3tvalue" not in text and "http://h:1" in text
    assert StorageOptions.from_json(o.to_json()) == o


def test_options_resolve_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret123")
    r = StorageOptions(region="us-west-2").resolved()
    assert (r.endpoint_url, r.region, r.access_key, r.secret_key) == (
        "http://127.0.0.1:9", "us-west-2", "envkey123", "envsecret123")


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    StorageOptions(access_key="optionkey42").resolved()
    text = storage.redact("a topsecretvalue b optionkey42 s3://b/k?secret_key=zzz&access_key=yyy&region=x")
    assert "topsecretvalue" not in text and "optionkey42" not in text
    assert "zzz" not in text and "yyy" not in text and "region=x" in text


def test_join(tmp_path):
    assert storage.join("s3://b/p/", "x", "/y.bin") == "s3://b/p/x/y.bin"
    assert storage.join(str(tmp_path), "a") == f"{tmp_path}/a"


def _exercise(base: str, options=None) -> None:
    """Same contract for local disk and S3."""
    a = storage.join(base, "d", "a.bin")
    assert not storage.exists(a, options)
    storage.write_bytes_atomic(a, b"0123456789", options)
    assert storage.exists(a, options)
    assert storage.file_size(a, options) == 10
    assert storage.read_bytes(a, options) == b"0123456789"
    assert storage.read_bytes(a, options, start=3, end=7) == b"3456"
    storage.write_bytes_atomic(a, b"new", options)  # overwrite
    assert storage.read_bytes(a, options) == b"new"
    with storage.open_atomic(storage.join(base, "d", "sub", "t.txt"), "w", options) as f:
        f.write("héllo")
    assert storage.read_bytes(storage.join(base, "d", "sub", "t.txt"), options) == "héllo".encode()
    # a directory/prefix is not a file
    assert not storage.exists(storage.join(base, "d"), options)
    assert storage.list_files(storage.join(base, "d"), options) == sorted(
        [storage.join(base, "d", "a.bin"), storage.join(base, "d", "sub", "t.txt")])
    assert storage.list_files(storage.join(base, "nothing-here"), options) == []

    # an exception inside open_atomic leaves nothing (and keeps an older version intact)
    b = storage.join(base, "d", "b.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_atomic(b, "wb", options) as f:
            f.write(b"x" * (6 << 20))  # larger than one multipart part
            raise RuntimeError("boom")
    assert not storage.exists(b, options)
    with pytest.raises(RuntimeError):
        with storage.open_atomic(a, "wb", options) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert storage.read_bytes(a, options) == b"new"
    # a large successful streamed write arrives whole
    with storage.open_atomic(b, "wb", options) as f:
        for i in range(3):
            f.write(bytes([i]) * (3 << 20))
    assert storage.file_size(b, options) == 9 << 20
    assert storage.read_bytes(b, options, start=(6 << 20) - 1, end=(6 << 20) + 1) == b"\x01\x02"

    with pytest.raises(StorageError, match="missing.bin.*not found"):
        storage.read_bytes(storage.join(base, "missing.bin"), options)
    with pytest.raises(StorageError, match="not found"):
        storage.file_size(storage.join(base, "missing.bin"), options)

    storage.remove(a, options)
    assert not storage.exists(a, options)
    storage.remove(a, options)  # idempotent
    storage.remove(storage.join(base, "d"), options, recursive=True)
    assert storage.list_files(base, options) == []


def test_local_contract(tmp_path):
    _exercise(str(tmp_path / "root"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_local_write_failure_is_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *a, **kw):
        os.close(fd)
        return FullDisk()

    target = tmp_path / "out" / "big.bin"
    monkeypatch.setattr(storage.os, "fdopen", fdopen)
    with pytest.raises(StorageError, match=r"big\.bin.*No space left"):
        with storage.open_atomic(str(target), "wb") as f:
            f.write(b"x" * 100)
    with pytest.raises(StorageError, match=r"big\.bin"):
        storage.write_bytes_atomic(str(target), b"abc")
    monkeypatch.setattr(storage.os, "fdopen", real_fdopen)
    assert os.listdir(tmp_path / "out") == []  # neither the file nor a temporary one
    # a user error inside the block is not relabelled
    with pytest.raises(OSError, match="not a storage error") as ei:
        with storage.open_atomic(str(target), "wb") as f:
            raise OSError("not a storage error")
    assert not isinstance(ei.value, StorageError)


def test_remove_stale_temporaries(tmp_path):
    import time

    d = tmp_path / "v" / "shards"
    d.mkdir(parents=True)
    storage.write_bytes_atomic(str(d / "kept.parquet"), b"data")
    names = [".a.parquet.x1.tmp", ".b.parquet.x2.tmp", "c.tmp", ".d.parquet"]
    for n in names:
        (d / n).write_bytes(b"partial")
    old = time.time() - 7200
    for n in names[1:]:
        os.utime(d / n, (old, old))
    # only old dot-files ending in .tmp go; recent ones and other names stay
    assert storage.remove_stale_temporaries(str(tmp_path / "v"), 3600) == 1
    assert sorted(os.listdir(d)) == sorted(["kept.parquet", ".a.parquet.x1.tmp", "c.tmp", ".d.parquet"])
    assert storage.remove_stale_temporaries(str(tmp_path / "missing"), 3600) == 0
    assert storage.remove_stale_temporaries("s3://bucket/prefix", 3600) == 0


def test_local_file_uri(tmp_path):
    storage.write_bytes_atomic(f"file://{tmp_path}/x.bin", b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"
    assert storage.list_files(f"file://{tmp_path}") == [str(tmp_path / "x.bin")]


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.get_fs("gs://b/x")


@pytest.mark.s3
def test_s3_contract_env(s3):
    _exercise(s3.bucket("stor-env") + "/p")


@pytest.mark.s3
def test_s3_contract_explicit_options(s3, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    _exercise(s3.bucket("stor-opts"), s3.options())


@pytest.mark.s3
def test_s3_wrong_secret_is_storage_error_without_secret(s3):
    base = s3.bucket("stor-auth")
    storage.write_bytes_atomic(base + "/k.bin", b"x")
    bad = s3.options().replace(secret_key="WRONGwrongWRONG-secret")
    for op in (lambda: storage.read_bytes(base + "/k.bin", bad),
               lambda: storage.write_bytes_atomic(base + "/k2.bin", b"y", bad),
               lambda: storage.list_files(base, bad),
               lambda: storage.exists(base + "/k.bin", bad)):
        with pytest.raises(StorageError, match="access denied") as ei:
            op()
        msg = str(ei.value)
        assert "stor-auth" in msg
        assert "WRONGwrongWRONG-secret" not in msg and s3.secret_key not in msg
    # a part upload refused in the middle of a streamed write (past s3fs's 50 MiB buffer)
    # names the object too
    chunk = b"x" * (20 << 20)
    with pytest.raises(StorageError, match="big.bin.*access denied") as ei:
        with storage.open_atomic(base + "/big.bin", "wb", bad) as f:
            for _ in range(3):
                f.write(chunk)
    assert "WRONGwrongWRONG-secret" not in str(ei.value)
    assert not storage.exists(base + "/big.bin", s3.options())
    assert not storage.exists(base + "/k2.bin")


@pytest.mark.s3
def test_s3_missing_bucket_and_unreachable_endpoint(s3, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the unreachable endpoint fails after one retry
    for op in (lambda: storage.read_bytes("s3://no-such-bucket-xyz/k"),
               lambda: storage.list_files("s3://no-such-bucket-xyz"),
               lambda: storage.exists("s3://no-such-bucket-xyz/k"),
               lambda: storage.write_bytes_atomic("s3://no-such-bucket-xyz/k", b"1")):
        with pytest.raises(StorageError, match="no-such-bucket-xyz.*bucket not found"):
            op()
    from s3_server import free_ports

    dead = s3.options().replace(endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(StorageError, match="endpoint unreachable"):
        storage.read_bytes("s3://stor-env/x", dead)


@pytest.mark.s3
def test_s3_fs_cached_and_picklable(s3):
    base = s3.bucket("stor-pickle")
    storage.write_bytes_atomic(base + "/k.bin", b"pickled")
    fs1, path = storage.get_fs(base + "/k.bin")
    fs2, _ = storage.get_fs(base + "/other")
    assert fs1 is fs2
    clone = pickle.loads(pickle.dumps(fs1))
    assert clone.cat_file(path) == b"pickled"


@pytest.mark.s3
def test_s3_pyarrow_fs(s3):
    base = s3.bucket("stor-arrow")
    storage.write_bytes_atomic(base + "/a/k.bin", b"arrow!")
    fs, path = storage.get_pyarrow_fs(base + "/a/k.bin")
    with fs.open_input_file(path) as f:
        assert f.read() == b"arrow!"
    import pyarrow.fs as pafs

    fs2, p2 = storage.get_pyarrow_fs(base + "/a")
    assert [i.path for i in fs2.get_file_info(pafs.FileSelector(p2))] == [path]


@pytest.mark.s3
@pytest.mark.ray
def test_s3_from_ray_worker(s3, ray_session):
    """A filesystem made in the driver works inside a Ray worker, both pickled and via get_fs."""
    import numpy as np

    from pipeline.io import vectors

    uri = s3.bucket("stor-ray") + "/w.fvecs"
    x = np.arange(40, dtype=np.float32).reshape(8, 5)
    vectors.write_vectors(uri, x)
    fs, path = storage.get_fs(uri)

    @ray_session.remote(num_cpus=0.5)
    def work(fs_, path_, uri_, options):
        from pipeline.io import vectors as v

        return fs_.cat_file(path_, start=0, end=4), v.read_rows(uri_, 2, 5, options=options)

    # options passed explicitly: the Ray instance may have been started before the AWS_* env vars
    head, rows = ray_session.get(work.remote(fs, path, uri, s3.options()), timeout=120)
    assert head == np.array([5], "<i4").tobytes()
    np.testing.assert_array_equal(rows, x[2:5])


def _conditional_writes(root: str, options=None) -> None:
    from pipeline.io.storage import create_exclusive, read_tagged, replace_if_unchanged

    uri = storage.join(root, "claims", "v000001")
    assert read_tagged(uri, options) == (None, None)
    assert create_exclusive(uri, b"first", options) is True
    assert create_exclusive(uri, b"second", options) is False  # already claimed: left unchanged
    data, tag = read_tagged(uri, options)
    assert data == b"first" and tag
    assert replace_if_unchanged(uri, b"next", tag, options) is True
    assert replace_if_unchanged(uri, b"stale", tag, options) is False  # changed since the read
    assert storage.read_bytes(uri, options) == b"next"
    other = storage.join(root, "claims", "absent")
    assert replace_if_unchanged(other, b"x", "some-tag", options) is False
    assert replace_if_unchanged(other, b"x", None, options) is True
    assert replace_if_unchanged(other, b"y", None, options) is False
    assert storage.read_bytes(other, options) == b"x"


def test_conditional_writes_locally(tmp_path):
    _conditional_writes(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "claims").iterdir() if not p.name.endswith(".lock")) == \
        ["absent", "v000001"]  # no temporaries left


def test_concurrent_local_replace_lets_exactly_one_writer_win(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.io.storage import read_tagged, replace_if_unchanged

    uri = str(tmp_path / "CURRENT")
    storage.write_bytes_atomic(uri, b"v0")
    _, tag = read_tagged(uri)
    with ThreadPoolExecutor(8) as ex:
        won = list(ex.map(lambda i: replace_if_unchanged(uri, f"w{i}".encode(), tag), range(8)))
    assert sum(won) == 1 and storage.read_bytes(uri) == f"w{won.index(True)}".encode()


@pytest.mark.s3
def test_conditional_writes_on_s3(s3):
    _conditional_writes(s3.bucket("conditional"), s3.options())


class _FlakyS3Proxy:
    """An HTTP proxy in front of the S3 server that answers requests ``fail_from`` to ``fail_to``
    (counted from 0) with ``503 SlowDown``, or drops their connection, and forwards the others
    unchanged (the Host header too, so the request signatures still hold)."""

    def __init__(self, upstream: str, fail_from: int = 0, fail_to: int = 0, drop: bool = False):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self.requests = 0
        self.failed = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    n = proxy.requests
                    proxy.requests += 1
                    fail = fail_from <= n < fail_to
                    proxy.failed += fail
                if fail and drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.s3
@pytest.mark.parametrize("drop", [False, True], ids=["503-slowdown", "connection-dropped"])
def test_s3_transient_errors_are_retried(s3, drop):
    """Throttling answers and dropped connections are retried with backoff; the reads and writes
    in between succeed as if nothing happened."""
    base = s3.bucket("stor-flaky")
    storage.write_bytes_atomic(base + "/k.bin", b"x" * 5000)
    proxy = _FlakyS3Proxy(s3.endpoint_url, fail_from=0, fail_to=5, drop=drop)
    try:
        opts = s3.options().replace(endpoint_url=proxy.url)
        assert storage.read_bytes(base + "/k.bin", opts, 10, 20) == b"x" * 10
        assert proxy.failed == 5 and proxy.requests >= 6
        proxy.requests, proxy.failed = 0, 0
        storage.write_bytes_atomic(base + "/w.bin", b"written through faults", opts)
        assert storage.read_bytes(base + "/w.bin") == b"written through faults"
        assert proxy.failed == 5
    finally:
        proxy.close()


@pytest.mark.s3
def test_s3_errors_that_persist_fail_in_bounded_time_with_one_line(s3, monkeypatch):
    import time

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    base = s3.bucket("stor-flaky")
    proxy = _FlakyS3Proxy(s3.endpoint_url, fail_from=0, fail_to=10**9)
    try:
        t0 = time.time()
        with pytest.raises(StorageError) as err:
            storage.read_bytes(base + "/k.bin", s3.options().replace(endpoint_url=proxy.url))
        assert time.time() - t0 < 60
        assert "stor-flaky/k.bin" in str(err.value) and "\n" not in str(err.value)
        assert proxy.requests >= 3  # every attempt was made
    finally:
        proxy.close()
