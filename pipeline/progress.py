"""Progress of long work: a bar with the total, the rate and the time left on a terminal (tqdm),
and a log line with the same figures every few seconds otherwise (a job's log, a pipe, CI).

``QINCO_PROGRESS=bar`` or ``log`` forces one or the other; ``off`` shows nothing. The jobs' JSON
reports do not depend on it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0


def _mode() -> str:
    mode = os.environ.get("QINCO_PROGRESS", "").strip().lower()
    if mode in ("bar", "log", "off"):
        return mode
    return "bar" if sys.stderr.isatty() else "log"


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``total`` units of work (``unit``: "vectors", "queries", "epochs", ...) of which ``initial``
    are already done (a resumed job); :meth:`update` as they complete, :meth:`close` at the end.
    The rate counts only this run's units."""

    def __init__(self, total: int, unit: str, desc: str, initial: int = 0, every_s: float = LOG_EVERY_S):
        self.total, self.unit, self.desc = int(total), unit, desc
        self.done = self.initial = int(initial)
        self.every_s = every_s
        self.t0 = self.last = time.perf_counter()
        self.mode = _mode()
        self.bar = (tqdm(total=self.total, initial=self.initial, unit=f" {unit}", desc=desc, unit_scale=True,
                         dynamic_ncols=True, leave=True)
                    if self.mode == "bar" else None)

    def rate(self) -> float:
        return (self.done - self.initial) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        """``desc: done/total unit (rate unit/s, time left)``."""
        r = self.rate()
        left = (self.total - self.done) / r if r > 0 else None
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({r:,.0f} {self.unit}/s"
                + (f", {format_duration(left)} left" if left is not None and self.done < self.total else "") + ")")

    def update(self, n: int = 1, **postfix) -> None:
        self.done += int(n)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(int(n))
            return
        now = time.perf_counter()
        if self.mode == "log" and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            log.info("%s%s", self.line(), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def training_progress(epochs: int | None, budget_s: float | None, epochs_done: int = 0,
                      seconds_used: float = 0.0) -> Progress | None:
    """Progress of a training run: over its seconds when a time budget ends it (the epochs that
    fit are unknown), else over its epochs; None when neither bounds it (early stopping alone)."""
    if budget_s is not None:
        return Progress(int(budget_s), "s", "train", initial=min(int(budget_s), int(seconds_used)))
    if epochs is not None:
        return Progress(epochs, "epochs", "train", initial=min(epochs, epochs_done))
    return None
