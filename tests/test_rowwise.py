"""Batch-invariant products: a row's value does not depend on the rows around it or the threads.

These are the properties the search's equal-results promises rest on (1 or 3 shards, any query
batch, any thread count). CI runs them once more with each numeric library held to its AVX2
kernels (``.ci/run``), where plain products break them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.codec.rowwise import TILE_ROWS, linear_rows, matmul_rows

BATCHES = (1, 2, 3, 5, 7, 11, 12, TILE_ROWS - 1, TILE_ROWS + 1, 300)
THREADS = (1, 2, 4)


def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I,O", [(16, 16), (50, 64), (128, 256), (384, 96)])
def test_rows_of_a_product_do_not_depend_on_the_batch_or_the_threads(dtype, I, O):
    rng = np.random.default_rng(I * 1000 + O)
    x = torch.from_numpy(rng.normal(size=(1000, I)).astype(np.float32)).to(dtype)
    w = torch.from_numpy(rng.normal(size=(O, I)).astype(np.float32)).to(dtype)
    ref = linear_rows(x, w)
    assert ref.dtype == dtype and ref.shape == (1000, O)
    np.testing.assert_allclose(ref.float().numpy(), (x.float() @ w.float().T).numpy(),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    before = torch.get_num_threads()
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            for b in BATCHES:
                for off in (0, 3, 517):  # the row's position in its tile changes too
                    got = linear_rows(x[off:off + b], w)
                    assert torch.equal(got, ref[off:off + b]), (n, b, off)
    finally:
        torch.set_num_threads(before)


def test_bias_empty_input_and_shape_errors():
    x = torch.randn(5, 3)
    w = torch.randn(4, 3)
    b = torch.randn(4)
    torch.testing.assert_close(linear_rows(x, w, b), torch.nn.functional.linear(x, w, b))
    assert matmul_rows(x[:0], w.T).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, I\) @ \(I, O\)"):
        matmul_rows(x, w)


def _random_model(dim, variant, nlist):
    from pipeline.codec.model import QINCo, QincoConfig

    torch.manual_seed(0)
    model = QINCo(QincoConfig(dim=dim, M=4, K=32, variant=variant, L=2, h=48, de=32, dh=64, A=0, B=1,
                              nlist=nlist))
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised layers too, so every product matters
            p.normal_(0.0, 0.3)
    if nlist:
        model.set_centroids(np.random.default_rng(1).normal(size=(nlist, dim)).astype(np.float32))
    return model


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant,nlist", [("qinco2", 8), ("qinco1", 0)])
def test_decoder_gives_a_row_the_same_bits_in_any_batch_and_thread_count(precision, variant, nlist):
    """The re-rank's exact distances come from the decoder: a row decoded alone, with a few others
    or with many, on 1 to 4 threads, is the same vector bit for bit (so merged shards, query
    batches and threaded searches rank it the same)."""
    from pipeline.codec.decoder import Decoder

    model = _random_model(50, variant, nlist)
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 32, (700, 4)).astype(np.uint8)
    lids = rng.integers(0, nlist, 700) if nlist else None
    dec = Decoder(model, precision)
    ref = dec(codes, lids)
    before = torch.get_num_threads()
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            other = Decoder(model, precision)  # tables built on another thread count
            for b in BATCHES:
                for off in (0, 5, 333):
                    sl = slice(off, off + b)
                    got = other(codes[sl], None if lids is None else lids[sl])
                    np.testing.assert_array_equal(got, ref[sl], err_msg=f"threads {n}, batch {b}, offset {off}")
    finally:
        torch.set_num_threads(before)
