"""Beam-search encoder and decoders on a briefly trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.codec.decoder import decode, reconstruction_mse
from pipeline.codec.encoder import reconstruct
from pipeline.codec.beam_search import auto_batch_size
from pipeline.codec.codes import code_dtype
from pipeline.codec.encoder import encode
from pipeline.codec.model import QINCo, QincoConfig
from pipeline.codec.rq_init import init_from_rq
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(codec_vectors):
    x, xv, _ = codec_vectors
    q = QincoConfig(dim=x.shape[1], M=4, K=32, L=1, de=32, dh=64, A=8, B=4, B_train=2)
    t = TrainConfig(epochs=2, batch_size=256, lr=3e-3, warmup_steps=5, rq_iters=4, fit_additive=False)
    model, _ = train_model(x, xv, q, t)
    return model, xv


def test_beam_not_worse_than_greedy(trained):
    model, xv = trained
    mse = {B: reconstruction_mse(xv, reconstruct(model, xv, B=B)) for B in (1, 4)}
    assert mse[4] <= mse[1]


def test_preselect_all_equals_no_preselection(trained):
    model, xv = trained
    c0, _ = encode(model, xv, A=0)
    cK, _ = encode(model, xv, A=model.config.K)
    np.testing.assert_array_equal(c0, cK)
    # a small A really restricts the candidates (different codes for some vectors)
    c2, _ = encode(model, xv, A=2, B=1)
    g0, _ = encode(model, xv, A=0, B=1)
    assert (c2 != g0).any()


def test_prefix_decoding_improves_with_m(trained):
    model, xv = trained
    codes, _ = encode(model, xv)
    mses = [reconstruction_mse(xv, decode(model, codes, prefix=m)) for m in range(1, 5)]
    assert all(b < a for a, b in zip(mses, mses[1:]))
    np.testing.assert_allclose(decode(model, codes, prefix=4), decode(model, codes), rtol=0, atol=0)


def test_bfloat16_decoding_is_close_to_float32_and_precision_is_checked(trained):
    from pipeline.errors import ConfigError

    model, xv = trained
    codes, _ = encode(model, xv)
    x32 = decode(model, codes)
    x16 = decode(model, codes, precision="bfloat16")
    assert x16.dtype == np.float32 and not np.array_equal(x16, x32)  # the network really ran in bf16
    # the bf16 error is far below the quantisation error it would perturb
    assert reconstruction_mse(x32, x16) < 0.02 * reconstruction_mse(xv, x32)
    np.testing.assert_array_equal(decode(model, codes, precision="float32"), x32)
    with pytest.raises(ConfigError, match="precision must be one of"):
        decode(model, codes, precision="int8")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        decode(model, codes, precision="float16")


def test_bfloat16_encoding_is_close_to_float32_and_precision_is_checked(trained):
    from pipeline.codec.precision import resolve_precision
    from pipeline.errors import ConfigError

    model, xv = trained
    c32, _ = encode(model, xv)
    np.testing.assert_array_equal(encode(model, xv, precision="float32")[0], c32)  # the CPU default
    c16, _ = encode(model, xv, precision="bfloat16")
    mse32, mse16 = (reconstruction_mse(xv, decode(model, c)) for c in (c32, c16))
    assert mse16 < 1.02 * mse32
    torch.manual_seed(0)  # a network with large weights: bfloat16 rounding changes some choices
    rand = QINCo(QincoConfig(dim=12, M=3, K=16, L=2, de=16, dh=24, A=0, B=2))
    with torch.no_grad():
        for prm in rand.parameters():
            prm.normal_(0.0, 0.5)
    xr = np.random.default_rng(0).normal(size=(500, 12)).astype(np.float32)
    assert (encode(rand, xr, precision="bfloat16")[0] != encode(rand, xr)[0]).any()
    assert resolve_precision(None, "cpu") == "float32" and resolve_precision(None, "cuda") == "float16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        encode(model, xv, precision="int8")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        encode(model, xv, precision="float16")


@pytest.mark.parametrize("variant,nlist", [("qinco2", 0), ("qinco2", 8), ("qinco1", 8)])
def test_reduced_precision_decode_equals_autocast(variant, nlist):
    """decode's bfloat16 path (weights cast once, no autocast) gives autocast's values bit for bit."""
    from pipeline.codec.decoder import decode_tensor
    from pipeline.codec.precision import autocast

    torch.manual_seed(0)
    cfg = QincoConfig(dim=12, M=3, K=16, variant=variant, L=2, h=24, de=16, dh=24, A=0, B=1, nlist=nlist)
    model = QINCo(cfg)
    with torch.no_grad():
        for prm in model.parameters():  # the zero-initialised layers too, so every weight matters
            prm.normal_(0.0, 0.5)
    if nlist:
        model.set_centroids(np.random.default_rng(1).normal(size=(nlist, 12)).astype(np.float32))
    model.eval()
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (300, 3)).astype(np.uint8)
    lists = rng.integers(0, nlist, 300) if nlist else None
    with torch.inference_mode(), autocast(torch.device("cpu"), "bfloat16"):
        ref = decode_tensor(model, torch.from_numpy(codes.astype(np.int64)),
                            None if lists is None else torch.from_numpy(lists)).float().numpy()
    got = decode(model, codes, lists, precision="bfloat16")
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, decode(model, codes, lists))  # and it is not float32


def test_decoder_reused_equals_decode_and_keeps_its_snapshot(trained):
    """A ``Decoder`` built once gives ``decode``'s values on every call (float32 and bfloat16, with
    a prefix and a batch size), and keeps the weights it was built with."""
    import copy

    from pipeline.codec.decoder import Decoder

    model, xv = trained
    codes, _ = encode(model, xv)
    for precision in ("float32", "bfloat16"):
        dec = Decoder(model, precision)
        for _ in range(2):
            np.testing.assert_array_equal(dec(codes), decode(model, codes, precision=precision))
        np.testing.assert_array_equal(dec(codes[:50], prefix=2, batch_size=7),
                                      decode(model, codes[:50], prefix=2, batch_size=7, precision=precision))
    m2 = copy.deepcopy(model)
    dec = Decoder(m2, "bfloat16")
    before = dec(codes)
    with torch.no_grad():
        m2.steps[1].blocks[0].up.weight.mul_(2.0)
    np.testing.assert_array_equal(dec(codes), before)
    assert not np.array_equal(Decoder(m2, "bfloat16")(codes), before)


def test_encode_and_decode_on_another_device_leave_the_callers_model_where_it_is(trained):
    """An encode or a ``Decoder`` on another device works on a copy of the model there; on the
    model's own device it uses the model itself. ("meta", a device without values, is the other
    device every torch build has; the GPU test checks the same on CUDA.)"""
    from pipeline.codec.decoder import Decoder
    from pipeline.codec.model import on_device

    model, xv = trained
    dec = Decoder(model, "float32", "meta")
    assert dec.model.device.type == "meta" and model.device.type == "cpu"
    with pytest.raises(RuntimeError):  # the beam search cannot run on meta, but only after the copy
        encode(model, xv[:8], device="meta", precision="float32")
    assert model.device.type == "cpu" and all(p.device.type == "cpu" for p in model.parameters())
    assert Decoder(model, "float32").model is model and on_device(model, "cpu") is model
    np.testing.assert_array_equal(decode(model, encode(model, xv[:8])[0]), reconstruct(model, xv[:8]))


def test_batching_does_not_change_codes(trained):
    model, xv = trained
    a, _ = encode(model, xv[:200])
    b, _ = encode(model, xv[:200], batch_size=7)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8
    assert 16 <= auto_batch_size(model, 32, 16) <= 65536


def test_large_K_uses_uint16():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    model = QINCo(QincoConfig(dim=8, M=2, K=300, L=1, de=8, dh=8, A=4, B=2))
    model.set_normalisation(x)
    init_from_rq(model, x, niter=2)
    codes, lids = encode(model, x)
    assert codes.dtype == np.uint16 and lids is None and codes.max() >= 256
    assert code_dtype(65536) == np.uint16
    assert reconstruction_mse(x, decode(model, codes)) < 0.5 * reconstruction_mse(x, x * 0 + x.mean(0))


@pytest.mark.parametrize("variant", ["qinco1", "qinco2"])
def test_greedy_search_matches_direct_network_evaluation(variant):
    """The expanded candidate distances pick the codeword a direct evaluation of every
    candidate through the step network picks, and return its reconstruction."""
    from pipeline.codec.beam_search import beam_search

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    model = QINCo(QincoConfig(dim=12, M=3, K=16, variant=variant, L=1, h=16, de=8, dh=16, A=0, B=1))
    model.set_normalisation(x)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    xn = model.normalise(torch.from_numpy(x))
    with torch.no_grad():
        codes, xhat = beam_search(model, xn, torch.zeros_like(xn), B=1, A=0, chunk=5)
        ref = torch.zeros_like(xn)
        for m, step in enumerate(model.steps):
            K = model.config.K
            f_NKD = torch.stack([step.decode_codes(torch.full((len(x),), k), ref) for k in range(K)], 1)
            best = ((xn[:, None] - ref[:, None] - f_NKD) ** 2).sum(-1).argmin(1)
            np.testing.assert_array_equal(codes[:, m].numpy(), best.numpy())
            ref = ref + f_NKD[torch.arange(len(x)), best]
    torch.testing.assert_close(xhat, ref, rtol=1e-4, atol=1e-4)


def test_lut_weight_chooses_the_final_beam_entry_by_the_combined_error(trained):
    """lut_weight λ picks, among the final beam, the entry with the least neural + λ lookup-table
    error: never a worse combined error than the neural-best entry, never a better neural one."""
    from pipeline.codec.additive import decode_additive, fit_additive_decoder
    from pipeline.codec.beam_search import beam_search, LutChoice
    from pipeline.errors import ConfigError

    model, xv = trained
    with pytest.raises(ConfigError, match="additive"):
        encode(model, xv, lut_weight=0.5)
    codes0, _ = encode(model, xv)
    model.set_additive_codebooks(fit_additive_decoder(codes0, xv, model.config.K))
    with pytest.raises(ConfigError, match="lut_weight must be >= 0"):
        encode(model, xv, lut_weight=-1.0)
    try:
        xn = model.normalise(torch.from_numpy(xv))
        xhat0 = torch.zeros_like(xn)
        with torch.inference_mode():
            c0, xh0 = beam_search(model, xn, xhat0, B=8, A=0)
            cw, xhw = beam_search(model, xn, xhat0, B=8, A=0, lut_weight=0.0)
            torch.testing.assert_close(cw, c0, rtol=0, atol=0)  # λ = 0 is the plain search
            cl, xhl = beam_search(model, xn, xhat0, B=8, A=0, lut_weight=2.0, chunk=7)
        assert (cl != c0).any(1).float().mean() > 0.05  # the choice really changes codes

        cb = model.additive_MKD.numpy()
        x = xv.astype(np.float64)

        def errors(codes, xhat_n):
            xr = model.denormalise(xhat_n).numpy().astype(np.float64)
            r = decode_additive(cb, codes.numpy()).astype(np.float64)
            a = np.clip((r * xr).sum(1) / (r * r).sum(1), -16, 16)
            return ((x - xr) ** 2).sum(1), ((x - a[:, None] * r) ** 2).sum(1)

        n0, l0 = errors(c0, xh0)
        nl, ll = errors(cl, xhl)
        tol = 1e-4 * (n0 + l0)
        assert np.all(nl >= n0 - tol)  # entry 0 of the final beam is the neural best
        assert np.all(nl + 2.0 * ll <= n0 + 2.0 * l0 + tol)
        assert ll.mean() < 0.95 * l0.mean()
        # encode passes the weight through and keeps the plain path otherwise
        np.testing.assert_array_equal(encode(model, xv, B=8, A=0, lut_weight=2.0)[0], cl.numpy())
        assert LutChoice(model, 0.1).weight == 0.1
    finally:
        model.set_additive_codebooks(None)
