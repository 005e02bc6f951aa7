"""Encode and decode arrays with a model (a loaded :class:`~pipeline.codec.model.QINCo` or its URI)."""

from __future__ import annotations

import numpy as np

from pipeline.codec.decoder import decode as _decode
from pipeline.codec.encoder import encode as _encode
from pipeline.codec.model import QINCo
from pipeline.codec.model_file import load_model
from pipeline.errors import ConfigError


def _model(model: QINCo | str, device: str, options) -> QINCo:
    if isinstance(model, QINCo):
        return model
    if isinstance(model, str):
        return load_model(model, device=device, options=options)
    raise ConfigError(f"model must be a QINCo model or a model URI, got {type(model).__name__}")


def encode(model: QINCo | str, x: np.ndarray, *, device: str = "cpu", B: int | None = None,
           A: int | None = None, batch_size: int | None = None,
           options=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes of the rows of ``x``: ``(codes_NM, list_ids_N)``; ``codes_NM`` uint8 (uint16 past
    256 codewords), ``list_ids_N`` the IVF list of each row (None for a model without IVF).
    ``model`` is a loaded model or its URI; ``B``/``A``: the beam search's width (default the
    model's)."""
    return _encode(_model(model, device, options), np.asarray(x), device=device, B=B, A=A,
                   batch_size=batch_size, source="encode(x)")


def decode(model: QINCo | str, codes: np.ndarray, list_ids: np.ndarray | None = None, *,
           prefix: int | None = None, device: str = "cpu", options=None) -> np.ndarray:
    """float32 vectors of ``codes`` (and their IVF lists, as :func:`encode` returns them);
    ``prefix`` m decodes with the first m codes only."""
    mdl = _model(model, device, options)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != mdl.config.M:
        raise ConfigError(f"codes must have shape (N, {mdl.config.M}) for this model, got {codes.shape}")
    if mdl.ivf and list_ids is None:
        raise ConfigError("this model has IVF lists: decode needs the list ids encode returned")
    return _decode(mdl, codes, list_ids, prefix=prefix, device=device)
