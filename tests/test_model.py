"""QINCo model: config/presets, initial equivalence with RQ, training forward, IVF, additive decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.codec.additive import AdditiveFitter, decode_additive, fit_additive_decoder, row_scales
from pipeline.codec.decoder import decode, reconstruction_mse
from pipeline.codec.encoder import encode
from pipeline.errors import ConfigError, VectorFormatError
from pipeline.train.loss import TrainingLoss
from pipeline.codec.model import PRESETS, QINCo, QincoConfig, config_from_preset
from pipeline.codec.rq_init import init_from_rq

torch.set_num_threads(1)


def tiny_config(dim: int, **kw) -> QincoConfig:
    base = dict(dim=dim, M=4, K=32, L=1, de=32, dh=64, A=8, B=4, B_train=2)
    base.update(kw)
    return QincoConfig(**base)


def test_presets_and_config_roundtrip():
    c = config_from_preset("qinco2-S", 128)
    assert (c.L, c.de, c.dh, c.A, c.B) == (2, 128, 256, 16, 32)
    assert c.code_bytes == 8.0
    assert config_from_preset("qinco1", 96, M=16).code_bytes == 16.0
    assert config_from_preset("qinco2-L", 96).L == 16
    assert set(PRESETS) >= {"qinco1", "qinco2-S", "qinco2-M", "qinco2-L", "cpu"}
    assert QincoConfig.from_json(c.to_json()) == c
    assert config_from_preset("cpu", 8, K=4096).code_bytes == 8 * 12 / 8
    with pytest.raises(ConfigError):
        config_from_preset("nope", 8)
    with pytest.raises(ConfigError):
        QincoConfig(dim=8, variant="qinco3")


@pytest.mark.parametrize("variant", ["qinco1", "qinco2"])
def test_fresh_model_decodes_like_its_rq_codebooks(codec_vectors, variant):
    x, _, _ = codec_vectors
    x = x[:1000]
    model = QINCo(tiny_config(x.shape[1], variant=variant, h=32))
    model.set_normalisation(x)
    init_from_rq(model, x, niter=4)
    codes, _ = encode(model, x, B=1)
    # additive decoding with the (normalised) step codebooks
    cb = torch.stack([s.codebook_KD.detach() for s in model.steps]).numpy()
    xn_hat = decode_additive(cb, codes)
    expected = xn_hat * float(model.scale) + model.mean_D.numpy()
    np.testing.assert_allclose(decode(model, codes), expected, rtol=1e-4, atol=1e-3 * float(model.scale))


def test_training_loss_has_gradients_and_sane_outputs(codec_vectors):
    x, _, _ = codec_vectors
    model = QINCo(tiny_config(x.shape[1]))
    model.set_normalisation(x)
    init_from_rq(model, x[:1000], niter=4)
    out = TrainingLoss(model)(torch.from_numpy(x[:128]))
    assert out["codes_BM"].shape == (128, 4)
    mse = out["mse_per_step"]
    assert torch.all(mse[1:] < mse[:-1])  # every step improves on average
    out["loss"].backward()
    step = model.steps[1]
    assert step.out_proj.weight.grad is not None and step.out_proj.weight.grad.abs().sum() > 0
    assert step.presel_KD.grad is not None and step.presel_KD.grad.abs().sum() > 0
    assert model.steps[0].codebook_KD.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors(codec_vectors):
    x, _, _ = codec_vectors
    model = QINCo(tiny_config(x.shape[1]))
    model.set_normalisation(x)
    with pytest.raises(VectorFormatError, match="dimension"):
        encode(model, x[:10, :-1], source="q.fvecs")
    bad = x[:10].copy()
    bad[7, 3] = np.nan
    with pytest.raises(VectorFormatError, match=r"q\.fvecs at row 7"):
        encode(model, bad, source="q.fvecs")
    with pytest.raises(ConfigError):
        decode(model, np.zeros((3, 5), np.uint8))
    with pytest.raises(ConfigError):
        decode(model, np.full((3, 4), 40, np.uint8))  # K = 32


def test_ivf_model_uses_centroid_as_start(codec_vectors):
    x, xv, _ = codec_vectors
    from pipeline.codec.encoder import assign_lists
    from pipeline.codec.ivf import IVFConfig, train_coarse_quantizer

    cent = train_coarse_quantizer(x, IVFConfig(nlist=8, niter=5, seed=0), progress=False)
    model = QINCo(tiny_config(x.shape[1], M=3, nlist=8))
    assert all(not s.plain for s in model.steps)  # every step is a network with IVF
    model.set_normalisation(x)
    model.set_centroids(cent)
    lids = assign_lists(model, x)
    init_from_rq(model, x, lids, niter=4)
    codes, lv = encode(model, xv)
    assert lv.dtype == np.int64 and lv.shape == (len(xv),)
    np.testing.assert_array_equal(lv, assign_lists(model, xv))
    np.testing.assert_allclose(decode(model, codes, lv, prefix=0), cent[lv], rtol=1e-5, atol=1e-3)
    full = reconstruction_mse(xv, decode(model, codes, lv))
    assert full < reconstruction_mse(xv, cent[lv])
    # the list id changes the decoding: shifting the start shifts the output
    other = (lv + 1) % 8
    moved = decode(model, codes, other)
    assert reconstruction_mse(xv, moved) > full
    with pytest.raises(ConfigError):
        model.set_centroids(cent[:4])


def test_additive_decoder_beats_initial_codebooks(codec_vectors):
    x, _, _ = codec_vectors
    model = QINCo(tiny_config(x.shape[1]))
    model.set_normalisation(x)
    init_from_rq(model, x, niter=4)
    # perturb the networks so codes are not additive any more
    with torch.no_grad():
        for s in model.steps[1:]:
            s.out_proj.weight.normal_(0, 0.05)
    codes, _ = encode(model, x)
    scale, mean = float(model.scale), model.mean_D.numpy()
    init_cb = torch.stack([s.codebook_KD.detach() for s in model.steps]).numpy() * scale
    init_cb[0] += mean
    fitted = fit_additive_decoder(codes, x, 32)
    assert fitted.shape == (4, 32, x.shape[1]) and fitted.dtype == np.float32
    mse_init = reconstruction_mse(x, decode_additive(init_cb, codes))
    mse_fit = reconstruction_mse(x, decode_additive(fitted, codes))
    assert mse_fit < 0.99 * mse_init
    # streaming in blocks gives the same solution
    f = AdditiveFitter(4, 32, x.shape[1])
    f.add(codes[:1000], x[:1000])
    g = AdditiveFitter(4, 32, x.shape[1])
    g.add(codes[1000:], x[1000:])
    f.merge(g)
    np.testing.assert_allclose(f.solve(), fitted, rtol=1e-3, atol=1e-2)
    model.set_additive_codebooks(fitted)
    assert model.additive_MKD.shape == (4, 32, x.shape[1])


def test_row_scales_are_the_least_squares_fit_along_the_additive_residual():
    rng = np.random.default_rng(0)
    M, K, D, L, N = 3, 8, 6, 4, 500
    cb = rng.normal(size=(M, K, D)).astype(np.float32)
    cent = (rng.normal(size=(L, D)) * 5).astype(np.float32)
    codes = rng.integers(0, K, (N, M))
    lids = rng.integers(0, L, N)
    a_true = rng.uniform(0.6, 1.4, N)
    r = decode_additive(cb, codes).astype(np.float64)
    noise = rng.normal(size=(N, D)) * 0.3

    # a decoder that is exactly c + a r (one batch of all rows): the scales are recovered
    a = row_scales(codes, lids, cent, cb, lambda c, l: cent[l] + a_true[:, None] * decode_additive(cb, c),
                   batch_rows=N)
    assert a.dtype == np.float16 and a.shape == (N,)
    np.testing.assert_allclose(a, a_true, rtol=2e-3)
    # any decoder: the scaled residual is never further from it than the plain one, row by row
    target = cent[lids] + 1.1 * r + noise
    a = row_scales(codes, lids, cent, cb, lambda c, l: target, batch_rows=N)
    err = lambda s: ((cent[lids] + s[:, None] * r - target) ** 2).sum(1)  # noqa: E731
    assert (err(a.astype(np.float64)) <= err(np.ones(N)) + 1e-6).all()
    assert err(a.astype(np.float64)).mean() < 0.9 * err(np.ones(N)).mean()
    # batches give the same scales as one pass; a zero residual gets scale 1
    codes_z = codes.copy()
    cb_z = cb.copy()
    cb_z[:, 0] = 0.0
    codes_z[:5] = 0
    a1 = row_scales(codes_z, lids, cent, cb_z, lambda c, l: cent[l] + 2.0 * decode_additive(cb_z, c), batch_rows=N)
    a2 = row_scales(codes_z, lids, cent, cb_z, lambda c, l: cent[l] + 2.0 * decode_additive(cb_z, c), batch_rows=64)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(a1[:5], 1.0)
    np.testing.assert_allclose(a1[5:], 2.0, rtol=1e-3)


@pytest.mark.parametrize("nlist", [0, 5])
def test_model_row_scales_fit_the_model_decode(nlist):
    """model_row_scales: the least-squares scale of the model's additive residual towards its own
    decode, with the list centroid removed under IVF and the whole vector without."""
    from pipeline.codec.decoder import model_centroids, model_codebooks, model_row_scales

    rng = np.random.default_rng(1)
    D, N = 8, 300
    x = rng.normal(size=(N, D)).astype(np.float32) * 3
    model = QINCo(tiny_config(D, nlist=nlist))
    model.set_normalisation(x)
    if nlist:  # centroids away from every row, so no residual is (nearly) zero
        model.set_centroids(x[:nlist] * 0.5 + 1.0)
    with pytest.raises(ConfigError, match="no additive decoder"):
        model_row_scales(model, np.zeros((1, 4), np.int64), np.zeros(1, np.int64))
    codes, lids = encode(model, x)
    model.set_additive_codebooks(fit_additive_decoder(codes, x, 32, lids, model_centroids(model) if nlist else None))
    a = model_row_scales(model, codes, lids)
    xhat = decode(model, codes, lids).astype(np.float64)
    base = model_centroids(model)[lids] if nlist else np.zeros((N, D))
    r = decode_additive(model_codebooks(model), codes).astype(np.float64)
    want = np.clip(((xhat - base) * r).sum(1) / (r * r).sum(1), -16, 16)  # clipped like the scales
    assert a.dtype == np.float16 and np.abs(want - 1).max() > 0.01
    np.testing.assert_allclose(a, want, rtol=1e-3)
