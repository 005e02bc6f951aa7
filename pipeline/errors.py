"""Exceptions the pipeline raises on bad input.

Every message names the file (URI, credentials redacted) and, where it applies, the byte offset
or row, so a user can find the problem without a debugger. The CLI turns any ``PipelineError``
into a one-line error and a non-zero exit.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors caused by input, configuration or environment (not by bugs)."""


class VectorFormatError(PipelineError):
    """A vector file is malformed: truncated, inconsistent headers, bad size, NaN/Inf values."""

    def __init__(self, uri: str, message: str, *, offset: int | None = None, row: int | None = None):
        self.uri = uri
        self.offset = offset
        self.row = row
        where = []
        if row is not None:
            where.append(f"row {row}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        loc = f" at {', '.join(where)}" if where else ""
        self.detail = message
        super().__init__(f"{uri}{loc}: {message}")

    def __reduce__(self):
        # Keyword-only arguments are not restored by the default exception pickling; rebuild
        # from the parts so the error keeps its type when raised inside a Ray task.
        return (_rebuild_vector_format_error, (type(self), self.uri, self.detail, self.offset, self.row))


def _rebuild_vector_format_error(cls, uri, message, offset, row):
    return cls(uri, message, offset=offset, row=row)


class StorageError(PipelineError):
    """A file, bucket or endpoint cannot be reached, or access is denied."""


class CheckpointError(PipelineError):
    """A model or training checkpoint is missing, corrupt, or incompatible."""


class ConfigError(PipelineError):
    """Inconsistent or invalid parameters."""


class ManifestError(PipelineError):
    """An index has no committed version, or a manifest / CURRENT object cannot be parsed."""


class ConcurrentWriterError(PipelineError):
    """Another job wrote to the same index first (a version claimed or committed, ``CURRENT``
    moved past this job's version)."""


class CorruptShardError(PipelineError):
    """A shard file is unreadable, malformed, or differs from its manifest entry. ``where`` names
    the file (credentials already redacted)."""

    def __init__(self, where: str, message: str):
        self.uri = where
        self.detail = message
        super().__init__(f"{where}: corrupt shard: {message}")

    def __reduce__(self):  # keeps its type when raised inside a Ray task or actor
        return (type(self), (self.uri, self.detail))


def find_pipeline_error(exc: BaseException) -> PipelineError | None:
    """The :class:`PipelineError` behind ``exc`` (``exc`` itself, or one it wraps), or None.

    Ray hands back an error raised in a task or actor wrapped: ``RayTaskError`` keeps it as
    ``.cause`` (and, raised as a subclass of the original type, carries the remote traceback in
    its text), Ray Data's ``UserCodeException`` as ``__cause__``. The original is what the user
    should see.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        inner = inner if isinstance(inner, BaseException) else None
        if isinstance(e, PipelineError) and inner is None:
            return e
        todo += [inner, e.__cause__, e.__context__]
    return None
