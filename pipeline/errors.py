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


class CorruptShardError(PipelineError):
    """A shard file is unreadable, malformed, or differs from its manifest entry. ``where`` names
    the file (credentials already redacted)."""

    def __init__(self, where: str, message: str):
        self.uri = where
        self.detail = message
        super().__init__(f"{where}: corrupt shard: {message}")

    def __reduce__(self):  # keeps its type when raised inside a Ray task or actor
        return (type(self), (self.uri, self.detail))
