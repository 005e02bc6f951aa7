"""The parameters of one search: the only definition, used by the in-process searcher, the query
job and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError


@dataclass
class SearchParams(JsonConfig):
    """Per-search parameters.

    k: results per query. nprobe: IVF lists visited per query. shortlist: candidates kept by
    the lookup-table stage. rerank: how many of the shortlist (best first) go to the neural
    decoder; None means all of it, 0 none (the results are the lookup-table ranking). With
    ``rerank < k`` the first ``rerank`` results are the re-ranked ones (exact distances) and the
    rest follow in lookup-table order, with their lookup-table distances: the fast end of the
    speed/recall trade-off.

    probe_ratio r (None: off): of a query's ``nprobe`` nearest lists, visit only those whose
    centroid's squared distance to the query is at most r times the nearest one's
    (``prune_lists``): an adaptive nprobe that spends the scan on queries near several lists.
    Every list visited with r is one that plain ``nprobe`` visits.

    prefix_steps P (0: off): the lookup-table stage first ranks the probed lists with the tables
    of the first P codebooks only (``c_l + Σ_{m<P} C_m[code_m]``: P table lookups per code
    instead of M), keeps the best ``prefix_shortlist`` (default 4 x shortlist) and ranks those with
    all M tables (and the row scales) down to ``shortlist``. Candidates that the full tables
    would put in the shortlist but the prefix tables rank below ``prefix_shortlist`` are lost.
    """

    k: int = 10
    nprobe: int = 16
    shortlist: int = 100
    rerank: int | None = None
    prefix_steps: int = 0
    prefix_shortlist: int | None = None
    probe_ratio: float | None = None

    def validate(self) -> "SearchParams":
        if self.k < 1:
            raise ConfigError(f"SearchParams.k must be >= 1, got {self.k}")
        if self.nprobe < 1:
            raise ConfigError(f"SearchParams.nprobe must be >= 1, got {self.nprobe}")
        if self.shortlist < self.k:
            raise ConfigError(
                f"SearchParams.shortlist ({self.shortlist}) must be >= k ({self.k})")
        if self.rerank is not None and not (0 <= self.rerank <= self.shortlist):
            raise ConfigError(
                f"SearchParams.rerank ({self.rerank}) must be between 0 and shortlist "
                f"({self.shortlist})")
        if self.probe_ratio is not None and not (np.isfinite(self.probe_ratio) and self.probe_ratio >= 1.0):
            raise ConfigError(f"SearchParams.probe_ratio must be a number >= 1 (or None: off), "
                              f"got {self.probe_ratio}")
        if self.prefix_steps < 0:
            raise ConfigError(f"SearchParams.prefix_steps must be >= 0, got {self.prefix_steps}")
        if self.prefix_shortlist is not None and self.prefix_shortlist < self.shortlist:
            raise ConfigError(f"SearchParams.prefix_shortlist ({self.prefix_shortlist}) must be >= "
                              f"shortlist ({self.shortlist})")
        return self

    @property
    def reranked(self) -> int:
        """How many of the shortlist the neural decoder re-ranks (0: none)."""
        return self.shortlist if self.rerank is None else self.rerank

    @property
    def candidates(self) -> int:
        """Candidates the lookup-table stage keeps: the shortlist, or only k without a re-rank."""
        return self.shortlist if self.reranked else self.k

    @property
    def prefix(self) -> tuple[int, int] | None:
        """``(P, S1)`` of the prefix stage, or None when it is off."""
        if not self.prefix_steps:
            return None
        return self.prefix_steps, (4 * self.shortlist if self.prefix_shortlist is None else self.prefix_shortlist)
