"""An index's versions: their history, rollback, garbage collection and verification.

These read and write only the index's manifests and shards (no model, no Ray), so they load fast.
"""

from __future__ import annotations

from pipeline.index.history import format_report, index_report
from pipeline.stages.maintain import collect_garbage, rollback, verify

__all__ = ["index_report", "format_report", "rollback", "collect_garbage", "verify"]
