"""The metric of an index: ``l2`` (squared Euclidean distance), ``ip`` (inner product) or
``cosine``, stored in the model's config (``QincoConfig.metric``) and so with every index.

One rule for all three: the codec always learns to reconstruct vectors (squared L2 error), and
the search ranks by a value where smaller is better:

- ``l2``: ``||q - x||^2``;
- ``ip``: ``-2 <q, x>``, which the lookup-table stage gets from the L2 terms by dropping the
  row's and the query's norms (:mod:`pipeline.search.scan`);
- ``cosine``: ``ip`` over unit vectors: the training, database and query vectors are divided by
  their norms where they enter (:func:`prepare`), as Faiss users normalise before an inner
  product index.

Results report what users of each metric expect (:func:`scores`): squared L2 distances
(ascending) for ``l2``, inner products for ``ip`` and cosine similarities for ``cosine``
(descending, ``<q, x̂>`` of the reconstruction).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError, VectorFormatError

METRICS = ("l2", "ip", "cosine")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def ranks_by_ip(metric: str) -> bool:
    """Whether the search ranks by ``-2 <q, x>`` (``ip`` and ``cosine``) rather than L2."""
    return check_metric(metric) != "l2"


def prepare(x_ND, metric: str, source: str = "<input>"):
    """The vectors as the index sees them: unit rows for ``cosine`` (float32; a zero row, which
    has no direction, is refused naming it), unchanged otherwise. NumPy arrays and tensors."""
    if check_metric(metric) != "cosine":
        return x_ND
    if isinstance(x_ND, torch.Tensor):
        x = x_ND.float()
        n = torch.linalg.vector_norm(x.double(), dim=1)
        bad = torch.nonzero(n == 0)
        if len(bad):
            raise VectorFormatError(source, "a zero vector has no cosine similarity", row=int(bad[0, 0]))
        return (x.double() / n[:, None]).float()
    x = np.asarray(x_ND, dtype=np.float32)
    n = np.sqrt(np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64)))
    bad = np.flatnonzero(n == 0)
    if bad.size:
        raise VectorFormatError(source, "a zero vector has no cosine similarity", row=int(bad[0]))
    return (x / n[:, None]).astype(np.float32)


def scores(D: np.ndarray, metric: str) -> np.ndarray:
    """The values results report, from the search's ranking values ``D`` (smaller is better):
    ``D`` for ``l2``, ``-D / 2`` (the inner product, -inf for padding) for ``ip`` and ``cosine``."""
    if not ranks_by_ip(metric):
        return D
    return (np.asarray(D, dtype=np.float32) * np.float32(-0.5)).astype(np.float32)
