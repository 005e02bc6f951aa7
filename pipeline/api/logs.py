"""Logging as the ``qinco`` command sets it up: one format, and secrets redacted from every line."""

from __future__ import annotations

import logging

from pipeline.io.storage import redact_log_handlers


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``), with credentials and signed request headers
    redacted from every handler's lines (botocore's debug lines carry them)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_log_handlers()
