"""One place that turns a URI (local path, ``file://``, ``s3://``) plus options into filesystems.

Everything that touches files goes through here so that credentials, endpoints and error
messages are handled the same way everywhere: ranged reads, atomic writes, listing, and a
``redact`` that keeps access keys out of logs and exceptions. Errors from the local disk,
s3fs or botocore become :class:`~pipeline.errors.StorageError` naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs
import s3fs

from pipeline.config import JsonConfig
from pipeline.errors import StorageError

log = logging.getLogger(__name__)

_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_known_secrets: set[str] = set()
_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


@dataclass(repr=False)
class StorageOptions(JsonConfig):
    """Where and how to reach object storage; every unset field falls back to the AWS env vars.

    ``__repr__`` masks the keys so an options object can be logged safely.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    anon: bool = False

    def __repr__(self) -> str:
        def mask(v: str | None) -> str:
            return "None" if v is None else "'***'"

        return (f"StorageOptions(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"access_key={mask(self.access_key)}, secret_key={mask(self.secret_key)}, "
                f"anon={self.anon!r})")

    __str__ = __repr__

    def resolved(self) -> "StorageOptions":
        """A copy with every unset field filled from the standard AWS environment variables."""
        env = os.environ
        out = StorageOptions(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
            anon=self.anon,
        )
        for s in (out.access_key, out.secret_key):
            if s:
                _known_secrets.add(s)
        return out


# ----------------------------------------------------------------------------------------- redaction

_QS_SECRET = re.compile(
    r"(?i)((?:aws_)?(?:access_key(?:_id)?|secret_key|secret_access_key|session_token|secret|password|token"
    r"|x-amz-credential|x-amz-signature|x-amz-security-token)=)([^&\s'\"]+)")
# signed request headers as botocore logs them: "Credential=AKID/date/region/s3/aws4_request",
# "Signature=hex", "'X-Amz-Security-Token': b'...'"
_HEADER_SECRET = re.compile(
    r"(?i)((?:\bCredential|\bSignature)=|x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)([^,\s'\"/&]+)")


def redact(text: str) -> str:
    """Remove access/secret keys (from the environment and any options seen) and query-string
    credentials from ``text``."""
    text = str(text)
    secrets = set(_known_secrets)
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v:
            secrets.add(v)
    # longest first so a key that contains another is removed whole
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, "***")
    return _HEADER_SECRET.sub(r"\1***", _QS_SECRET.sub(r"\1***", text))


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record with its message run through :func:`redact`:
    on a handler, it covers the records of every library (botocore's debug lines print signed
    request headers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is left for the handler to report
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_log_handlers(logger: logging.Logger | None = None) -> None:
    """Install :class:`RedactingFilter` on every handler of ``logger`` (default: the root)."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())


# ----------------------------------------------------------------------------------------- URIs

def _split(uri: str) -> tuple[str, str]:
    """(protocol, path-within-fs). Local paths become absolute; query strings are dropped."""
    uri = os.fspath(uri)
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        parts = urlsplit(uri)
        path = (parts.netloc + parts.path).rstrip("/") if parts.path not in ("", "/") else parts.netloc
        if not parts.netloc:
            raise StorageError(f"{redact(uri)}: S3 URI has no bucket")
        return "s3", path
    if uri.startswith("file://"):
        return "file", os.path.abspath(uri[len("file://"):])
    if "://" in uri:
        raise StorageError(f"{redact(uri)}: unsupported URI scheme (use a local path, file:// or s3://)")
    return "file", os.path.abspath(uri)


def _uri_of(protocol: str, path: str) -> str:
    return f"s3://{path}" if protocol == "s3" else path


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute (against this process's directory), so
    that Ray workers, which run elsewhere, reach the same file; other URIs unchanged."""
    protocol, path = _split(uri)  # local paths come back absolute
    return path if protocol == "file" else uri


def join(uri: str, *parts: str) -> str:
    """Append path components to a local path or URI with ``/`` (no duplicate separators)."""
    out = os.fspath(uri)
    for p in parts:
        p = str(p)
        if not p:
            continue
        out = out.rstrip("/") + "/" + p.lstrip("/")
    return out


# ----------------------------------------------------------------------------------------- filesystems

def get_fs(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path, ``file://`` or ``s3://`` URI.

    S3 filesystems are cached per (process, endpoint, credentials, region) so repeated calls are
    cheap; the pid in the key gives a forked worker its own instance (aiobotocore sessions do
    not survive a fork). Instances pickle by their constructor arguments, so they also work
    after being shipped to Ray workers.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), path
    opts = (options or StorageOptions()).resolved()
    attempts = s3_max_attempts()
    key = (os.getpid(), "s3", opts.endpoint_url, opts.region, opts.access_key, opts.secret_key, opts.anon, attempts)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            client_kwargs: dict[str, Any] = {}
            if opts.region:
                client_kwargs["region_name"] = opts.region
            fs = s3fs.S3FileSystem(
                anon=opts.anon,
                key=None if opts.anon else opts.access_key,
                secret=None if opts.anon else opts.secret_key,
                endpoint_url=opts.endpoint_url,
                client_kwargs=client_kwargs,
                config_kwargs={"connect_timeout": 10, "read_timeout": 120,
                               "retries": {"max_attempts": attempts, "mode": "standard"}},
                use_listings_cache=False,
                skip_instance_cache=True,
            )
            _cache[key] = fs
    return fs, path


DEFAULT_S3_ATTEMPTS = 8


def s3_max_attempts() -> int:
    """Tries per S3 request (``AWS_MAX_ATTEMPTS``, default 8): botocore's standard retry mode
    repeats connection errors, 5xx answers and throttling with jittered exponential backoff
    (at most 20 s apart), so a request gives up after about a minute at worst."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS", "")
    try:
        n = int(raw) if raw else DEFAULT_S3_ATTEMPTS
    except ValueError:
        raise StorageError(f"AWS_MAX_ATTEMPTS must be an integer, got {raw!r}") from None
    if not 1 <= n <= 50:
        raise StorageError(f"AWS_MAX_ATTEMPTS must be in 1..50, got {n}")
    return n


def _endpoint_parts(endpoint_url: str) -> tuple[str, str]:
    parts = urlsplit(endpoint_url if "://" in endpoint_url else "https://" + endpoint_url)
    return parts.scheme or "https", parts.netloc


def get_pyarrow_fs(uri: str, options: StorageOptions | None = None):
    """(pyarrow.fs.FileSystem, path within it): for Ray Data readers/writers and Ray Train."""
    protocol, path = _split(uri)
    if protocol == "file":
        return pafs.LocalFileSystem(), path
    opts = (options or StorageOptions()).resolved()
    kw: dict[str, Any] = {}
    if opts.anon:
        kw["anonymous"] = True
    else:
        if opts.access_key:
            kw["access_key"] = opts.access_key
        if opts.secret_key:
            kw["secret_key"] = opts.secret_key
    if opts.region:
        kw["region"] = opts.region
    if opts.endpoint_url:
        scheme, netloc = _endpoint_parts(opts.endpoint_url)
        kw["endpoint_override"] = netloc
        kw["scheme"] = scheme
    kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts())
    return pafs.S3FileSystem(**kw), path


def _error_message(uri: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    code = ""
    resp = getattr(exc, "response", None) or getattr(getattr(exc, "__cause__", None), "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    chain = exc
    while chain is not None and not code:
        r = getattr(chain, "response", None)
        if isinstance(r, dict):
            code = str(r.get("Error", {}).get("Code", ""))
        chain = chain.__cause__ or chain.__context__
    if code == "NoSuchBucket" or "bucket does not exist" in low or "nosuchbucket" in low:
        what = "bucket not found"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") \
            or isinstance(exc, PermissionError) or "access denied" in low or "forbidden" in low:
        what = "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    elif "could not connect" in low or "connect timeout" in low or "endpointconnectionerror" in low \
            or "connection refused" in low or "cannot connect" in low:
        what = "endpoint unreachable (check AWS_ENDPOINT_URL)"
    elif "nocredentials" in low or "unable to locate credentials" in low:
        what = "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    elif isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404"):
        what = "file not found"
    elif isinstance(exc, IsADirectoryError):
        what = "is a directory, not a file"
    else:
        what = "storage error"
    return redact(f"{uri}: {what} ({text})")


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Turn filesystem/botocore exceptions raised inside into StorageError naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend error class is mapped here
        if not _is_storage_exception(exc):
            raise
        raise StorageError(_error_message(uri, exc)) from None


def _is_storage_exception(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    mod = type(exc).__module__ or ""
    return mod.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec"))


# ----------------------------------------------------------------------------------------- operations

def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """True if a file (object) exists at ``uri``. For S3 an empty "directory" prefix is not a file."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    with _errors(uri):
        if protocol == "file":
            return os.path.isfile(path)
        # not fs.isfile(): it turns every error (wrong credentials included) into False
        try:
            return fs.info(path).get("type") == "file"
        except FileNotFoundError as exc:
            if "bucket does not exist" in str(exc).lower():
                raise
            return False


def list_files(uri_prefix: str, options: StorageOptions | None = None) -> list[str]:
    """Full URIs of every file (object) under a prefix/directory, sorted. Missing prefix -> []."""
    fs, path = get_fs(uri_prefix, options)
    protocol, _ = _split(uri_prefix)
    with _errors(uri_prefix):
        if protocol == "file":
            if os.path.isfile(path):
                return [path]
            if not os.path.isdir(path):
                return []
            out = []
            for root, _dirs, files in os.walk(path):
                out.extend(os.path.join(root, f) for f in files)
            return sorted(out)
        if "/" not in path:
            # a bare bucket: a missing bucket is an error, not an empty listing
            fs.ls(path, refresh=True)
        try:
            found = fs.find(path, withdirs=False, detail=True)
        except FileNotFoundError:
            return []
        files = [p for p, d in found.items() if d.get("type", "file") == "file" and not p.endswith("/")]
        return sorted(_uri_of(protocol, p) for p in files)


GLOB_CHARS = "*?["


def is_glob(uri: str) -> bool:
    """True if ``uri``'s path holds a glob pattern character (``*``, ``?``, ``[``)."""
    return any(c in _split(uri)[1] for c in GLOB_CHARS)


def glob_files(pattern: str, options: StorageOptions | None = None) -> list[str]:
    """Full URIs of the files (objects) matching a glob pattern, sorted: ``*`` and ``?`` match within
    one folder level, ``**`` across levels, ``[...]`` one of a set of characters."""
    fs, path = get_fs(pattern, options)
    protocol, _ = _split(pattern)
    with _errors(pattern):
        try:
            found = fs.glob(path, detail=True)
        except FileNotFoundError:
            return []
    files = [p for p, d in found.items() if d.get("type", "file") == "file" and not p.endswith("/")]
    return sorted(_uri_of(protocol, p) for p in files)


def newest_change(uri_prefix: str, options: StorageOptions | None = None) -> float | None:
    """Unix time of the newest modification of any file under a prefix; None when it holds none."""
    fs, path = get_fs(uri_prefix, options)
    protocol, _ = _split(uri_prefix)
    with _errors(uri_prefix):
        if protocol == "file":
            times = [os.stat(u).st_mtime for u in list_files(uri_prefix, options)]
            return max(times, default=None)
        try:
            found = fs.find(path, withdirs=False, detail=True)
        except FileNotFoundError:
            return None
        times = [d["LastModified"].timestamp() for d in found.values() if d.get("LastModified") is not None]
        return max(times, default=None)


# Writers on local disk write ``.NAME.<random>`` + this beside their target, then rename it.
_TEMP_SUFFIX = ".tmp"


def remove_stale_temporaries(dir_uri: str, older_than_s: float) -> int:
    """Delete the temporary files of killed writers under a local directory; returns how many.

    ``open_atomic`` and ``copy_file`` write ``.NAME.*.tmp`` beside their target and rename it
    into place, so a process killed mid-write leaves its temporary file behind. Only files not
    modified for ``older_than_s`` seconds are removed, so a live writer's file is left alone. On
    S3 there is nothing to do: an unfinished upload never becomes an object.
    """
    protocol, path = _split(dir_uri)
    if protocol != "file" or not os.path.isdir(path):
        return 0
    removed, now = 0, time.time()
    with _errors(dir_uri):
        for root, _dirs, files in os.walk(path):
            for name in files:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                    continue
                full = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    if now - os.stat(full).st_mtime > older_than_s:
                        os.unlink(full)
                        removed += 1
    return removed


def read_bytes(uri: str, options: StorageOptions | None = None,
               start: int | None = None, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of a file with one ranged request (whole file if both unset)."""
    fs, path = get_fs(uri, options)
    with _errors(uri):
        return fs.cat_file(path, start=start, end=end)


def file_size(uri: str, options: StorageOptions | None = None) -> int:
    """Size of a file in bytes (a HEAD request on S3)."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    with _errors(uri):
        if protocol == "file":
            return os.stat(path).st_size
        info_ = fs.info(path)
        if info_.get("type") != "file":
            raise FileNotFoundError(path)
        return int(info_["size"])


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so readers see either the old file or the complete new one."""
    with open_atomic(uri, "wb", options) as f:
        f.write(data)


class _StorageErrorsOnWrite:
    """File proxy whose ``write``/``flush`` raise :class:`StorageError` naming the URI.

    A streamed write can fail half way (a full disk, an S3 part upload refused): the error then
    names the file being written, like every other storage error, instead of a bare ``OSError``.
    """

    def __init__(self, f, uri: str):
        self._f, self._uri = f, uri

    def write(self, data):
        with _errors(self._uri):
            return self._f.write(data)

    def flush(self):
        with _errors(self._uri):
            return self._f.flush()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _temp_beside(path: str) -> tuple[int, str]:
    """A new temporary file in ``path``'s directory (created if needed), named so that
    :func:`remove_stale_temporaries` recognises it: ``(fd, its path)``."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=_TEMP_SUFFIX)


@contextlib.contextmanager
def open_atomic(uri: str, mode: str = "wb", options: StorageOptions | None = None):
    """Yield a writable file; the content becomes visible at ``uri`` only if the block succeeds.

    A storage failure while writing (e.g. a full disk, or a multipart part upload refused)
    raises :class:`StorageError` naming ``uri``, and nothing is left at ``uri``.

    Local: a temporary file in the same directory, fsync'ed and renamed over ``uri``. S3: a
    (multipart) upload completed on success and aborted on exception — S3 makes an object
    visible only when its upload completes.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic: mode must be 'wb' or 'w', got {mode!r}")
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    if protocol == "file":
        with _errors(uri):
            fd, tmp = _temp_beside(path)
        raw = os.fdopen(fd, "wb")
        try:
            f = io.TextIOWrapper(raw, encoding="utf-8") if mode == "w" else raw
            yield _StorageErrorsOnWrite(f, uri)
            with _errors(uri):
                f.flush()
                os.fsync(raw.fileno())
                f.close()
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                raw.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    with _errors(uri):
        raw = fs.open(path, "wb", autocommit=True)
    try:
        f = io.TextIOWrapper(raw, encoding="utf-8", write_through=True) if mode == "w" else raw
        yield _StorageErrorsOnWrite(f, uri)
    except BaseException:
        with contextlib.suppress(Exception):
            raw.discard()
        raw.closed = True  # never let close()/__del__ upload the partial buffer
        raise
    with _errors(uri):
        if mode == "w":
            f.flush()
        raw.close()


# ----------------------------------------------------------------------------------------- conditional writes
#
# What lets several jobs share one index safely: an object created only if absent (S3
# ``If-None-Match: *``; locally a hard link, which fails when the name exists), and an object
# replaced only if unchanged since it was read (S3 ``If-Match: <ETag>``; locally under an
# exclusive ``flock`` of a lock file beside it, comparing content).


def _precondition_failed(exc: BaseException) -> bool:
    """True when an S3 call was refused because its If-None-Match / If-Match did not hold."""
    if isinstance(exc, FileExistsError):
        return True
    chain: BaseException | None = exc
    while chain is not None:
        r = getattr(chain, "response", None)
        if isinstance(r, dict):
            code = str(r.get("Error", {}).get("Code", ""))
            status = r.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412):
                return True
        chain = chain.__cause__ or chain.__context__
    return "precondition" in str(exc).lower()


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Create ``uri`` holding ``data`` unless it exists: True when this call created it, False
    when something was there already (left unchanged). Readers never see a partial file."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    if protocol == "file":
        with _errors(uri):
            fd, tmp = _temp_beside(path)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic, and fails if the name exists
                except FileExistsError:
                    return False
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
    except Exception as e:  # noqa: BLE001 - sorted below
        if _precondition_failed(e):
            return False
        with _errors(uri):
            raise
    return True


def read_tagged(uri: str, options: StorageOptions | None = None) -> tuple[bytes | None, str | None]:
    """``(content, tag)`` of a small object, ``(None, None)`` when it does not exist. Pass the tag
    to :func:`replace_if_unchanged`. On S3 the tag is the ETag, taken before the read: a change
    in between makes the later conditional write fail, never succeed on stale content."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    if protocol == "file":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(_error_message(uri, e)) from None
        return data, hashlib.sha256(data).hexdigest()
    with _errors(uri):
        try:
            etag = fs.info(path).get("ETag")
        except FileNotFoundError:
            return None, None
        try:
            return fs.cat_file(path), etag
        except FileNotFoundError:
            return None, None


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    with open(path + ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def replace_if_unchanged(uri: str, data: bytes, tag: str | None, options: StorageOptions | None = None) -> bool:
    """Write ``data`` to ``uri`` only if it still has the ``tag`` :func:`read_tagged` gave (None:
    only if it still does not exist). True when written, False when another writer changed it
    first (read again and decide again)."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    if protocol == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with _errors(uri), _local_lock(path):
            now, now_tag = read_tagged(uri, options)
            if now_tag != tag:
                return False
            write_bytes_atomic(uri, data, options)
            return True
    if tag is None:
        return create_exclusive(uri, data, options)
    try:
        fs.pipe_file(path, data, IfMatch=tag)
    except Exception as e:  # noqa: BLE001 - sorted below
        if _precondition_failed(e) or isinstance(e, FileNotFoundError):
            return False
        with _errors(uri):
            raise
    return True


def copy_file(src_uri: str, dst_uri: str, options: StorageOptions | None = None) -> None:
    """Copy an immutable file so that ``dst_uri`` appears atomically with the full content.

    Local: a hard link (no data copied; both names share one immutable inode) made under a
    temporary name and renamed into place, or a plain atomic copy across file systems. S3: a
    server-side copy (``CopyObject``; the bytes never pass through this process), which becomes
    visible only when complete. Source and destination must use the same protocol.
    """
    sp, spath = _split(src_uri)
    dp, dpath = _split(dst_uri)
    if sp != dp:
        raise ValueError(f"copy_file: {redact(src_uri)} and {redact(dst_uri)} are on different stores")
    fs, _ = get_fs(src_uri, options)
    if sp == "file":
        with _errors(src_uri):
            os.stat(spath)
        parent = os.path.dirname(dpath) or "."
        tmp = os.path.join(parent, f".{os.path.basename(dpath)}.{os.getpid()}.link{_TEMP_SUFFIX}")
        with _errors(dst_uri):
            os.makedirs(parent, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            try:
                os.link(spath, tmp)
            except OSError:  # no hard links here (other device, file system without them)
                tmp = None
            if tmp is not None:
                os.replace(tmp, dpath)
                return

        with _errors(src_uri), open(spath, "rb") as g, open_atomic(dst_uri, "wb", options) as f:
            shutil.copyfileobj(g, f, 1 << 22)
        return
    with _errors(src_uri):
        fs.copy(spath, dpath)


def remove(uri: str, options: StorageOptions | None = None, recursive: bool = False) -> None:
    """Delete a file, or a directory/prefix with ``recursive=True``. A missing path is a no-op."""
    fs, path = get_fs(uri, options)
    protocol, _ = _split(uri)
    with _errors(uri):
        if protocol == "file":
            if os.path.isdir(path):
                if not recursive:
                    raise IsADirectoryError(path)

                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            return


def _clear_cache() -> None:
    """Drop cached filesystems (tests; credentials changed)."""
    with _cache_lock:
        _cache.clear()
