"""The parameters of one search: the only definition, used by the in-process searcher, the query
job and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.config import JsonConfig
from pipeline.errors import ConfigError


@dataclass
class SearchParams(JsonConfig):
    """Per-search parameters.

    k: results per query. nprobe: IVF lists visited per query. shortlist: candidates kept by
    the lookup-table stage. pairwise (None: off): how many of the shortlist the pairwise decoder
    (:mod:`pipeline.codec.pairwise`, exact distances to its reconstruction) keeps for the neural
    re-rank; the shortlist is ranked by it in their place. rerank: how many of the shortlist (or
    of the pairwise stage's, best first) go to the neural decoder; None means all of it, 0 none
    (the results are the ranking of the stage before). With ``rerank < k`` the first ``rerank``
    results are the re-ranked ones (exact distances) and the rest follow in the order of the
    stage before, with its distances: the fast end of the speed/recall trade-off.

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
    pairwise: int | None = None
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
        if self.pairwise is not None and not (self.k <= self.pairwise <= self.shortlist):
            raise ConfigError(f"SearchParams.pairwise ({self.pairwise}) must be between k ({self.k}) "
                              f"and shortlist ({self.shortlist})")
        kept = self.shortlist if self.pairwise is None else self.pairwise
        if self.rerank is not None and not (0 <= self.rerank <= kept):
            raise ConfigError(
                f"SearchParams.rerank ({self.rerank}) must be between 0 and "
                + (f"shortlist ({self.shortlist})" if self.pairwise is None
                   else f"the pairwise stage's shortlist ({self.pairwise})"))
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
        """How many candidates the neural decoder re-ranks (0: none)."""
        if self.rerank is not None:
            return self.rerank
        return self.shortlist if self.pairwise is None else self.pairwise

    @property
    def candidates(self) -> int:
        """Candidates the lookup-table stage keeps: the shortlist, or only k when no later stage
        re-ranks it."""
        return self.shortlist if self.reranked or self.pairwise is not None else self.k

    @property
    def prefix(self) -> tuple[int, int] | None:
        """``(P, S1)`` of the prefix stage, or None when it is off."""
        if not self.prefix_steps:
            return None
        return self.prefix_steps, (4 * self.shortlist if self.prefix_shortlist is None else self.prefix_shortlist)


def search_params(overrides: dict[str, Any], base: SearchParams | None = None) -> SearchParams:
    """``base`` (default: the defaults) with the fields named in ``overrides`` replaced, validated;
    an unknown name or a value of the wrong kind is a ``ConfigError`` (requests and keyword
    arguments come from users)."""
    known = [f.name for f in fields(SearchParams)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown search parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    d = (base or SearchParams()).to_dict() | dict(overrides)
    for name in ("k", "nprobe", "shortlist", "rerank", "pairwise", "prefix_steps", "prefix_shortlist"):
        v = d[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ConfigError(f"search parameter {name} must be an integer, got {v!r}")
        d[name] = None if v is None else int(v)
    r = d["probe_ratio"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating))):
        raise ConfigError(f"search parameter probe_ratio must be a number, got {r!r}")
    return SearchParams(**d).validate()
