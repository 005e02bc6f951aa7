"""The threads the codec math may use in this process.

The math runs on two thread pools: torch's intra-op pool (the networks, beam search) and Faiss's
OpenMP pool (k-means, list assignment, and the BLAS that Faiss bundles). Both default to every
core of the machine. A process given fewer cores (a Ray actor with ``num_cpus=1`` beside others)
must cap both: an uncapped OpenMP pool runs more threads than the process has cores, and its
threads keep spinning for a while after each parallel section, taking CPU from the next torch
call and from the other actors.
"""

from __future__ import annotations

import faiss
import torch


def use_threads(n: int) -> int:
    """Cap torch's and Faiss's thread pools at ``n`` (at least 1) for this process; returns the cap."""
    n = max(1, int(n))
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n
