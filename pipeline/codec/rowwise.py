"""Matrix products whose rows do not depend on the batch they are computed in.

A BLAS library picks its kernel, blocking and thread split from the problem's shape and the
thread count, so the last bits of one row of ``x @ w`` can change with the number of rows around
it, the row's position among them and the threads in use. How depends on the library and the
CPU: MKL's float32 GEMM differs for a few rows and on several threads, oneDNN's bfloat16 GEMM
on AVX-512 CPUs without bfloat16 instructions, OpenBLAS's Haswell kernels with the row's
position (``tests/test_rowwise.py`` holds each library to its AVX2 kernels).

The search promises the same results for any query batch, split into shards or threads, and
its distances come from such products: the lookup tables, the coarse probe and the decoder
network's layers. Here the rows always go through one shape of problem: they are cut into
tiles of ``TILE_ROWS`` rows (the last one padded with zeros) and multiplied by one batched
product of identical ``(TILE_ROWS x I) @ (I x O)`` problems, each computed whole by one thread.
A row's value then depends on its own values and its position in its tile, not on how many rows
came with it or how many threads ran; the tests check that the position does not matter either
on the kernels this machine and its AVX2 fallbacks use.

Public API: ``matmul_rows(x_NI, w_IO)``, ``linear_rows(x_NI, w_OI, bias_O=None)``,
``TILE_ROWS``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per tile: small enough that a batch of a few rows pays little for its padding, large
# enough that the batched product runs at the speed of one large GEMM (bench/RESULTS.md,
# "Batch-invariant products").
TILE_ROWS = 64


def matmul_rows(x_NI: Tensor, w_IO: Tensor) -> Tensor:
    """``x @ w`` (``(N, O)``) with each row computed as in any other batch (module docstring).

    Under autocast the batched product runs in autocast's precision, like ``x @ w`` would. A
    contiguous ``w`` is read once for all tiles; a transposed view would be copied per tile.
    """
    if x_NI.dim() != 2 or w_IO.dim() != 2 or x_NI.shape[1] != w_IO.shape[0]:
        raise ValueError(f"matmul_rows needs (N, I) @ (I, O), got {tuple(x_NI.shape)} @ {tuple(w_IO.shape)}")
    N, I = x_NI.shape
    O = w_IO.shape[1]
    R = TILE_ROWS
    dev = x_NI.device.type
    # products into ``out=`` are not autocast: cast the inputs as autocast would
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x_NI, w_IO = x_NI.to(dt), w_IO.to(dt)
    out_NO = torch.empty((N, O), dtype=torch.promote_types(x_NI.dtype, w_IO.dtype), device=x_NI.device)
    x_NI = x_NI.contiguous()
    full = N // R * R
    if full:  # the whole tiles, multiplied in place (views, no copy)
        T = full // R
        torch.bmm(x_NI[:full].view(T, R, I), w_IO.unsqueeze(0).expand(T, I, O),
                  out=out_NO[:full].view(T, R, O))
    if full < N:  # the last rows, in a zero-padded tile of the same shape
        x_RI = x_NI.new_zeros((R, I))
        x_RI[:N - full] = x_NI[full:]
        out_NO[full:] = torch.bmm(x_RI.unsqueeze(0), w_IO.unsqueeze(0))[0, :N - full]
    return out_NO


def linear_rows(x_NI: Tensor, w_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear`` computed by :func:`matmul_rows` (weights ``(O, I)``)."""
    y = matmul_rows(x_NI, w_OI.T)
    return y if bias_O is None else y + bias_O
