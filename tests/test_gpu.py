"""The CUDA paths of the codec: training, encoding, decoding, row scales and the re-rank on a GPU
agree with the CPU. Skipped where torch sees no CUDA device (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.codec.decoder import model_row_scales
from pipeline.codec.model_file import load_model, save_model
from pipeline.codec.decoder import Decoder, decode, reconstruction_mse
from pipeline.codec.encoder import encode
from pipeline.codec.model import QincoConfig
from pipeline.search.params import SearchParams
from pipeline.search.scan import ShardSearcher
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device visible to torch: the GPU paths are checked on a GPU machine")

QCFG = dict(M=4, K=32, L=1, de=32, dh=64, A=8, B=4, B_train=2, nlist=4)


@pytest.fixture(scope="module")
def cpu_model(codec_vectors):
    x, xv, _ = codec_vectors
    q = QincoConfig(dim=x.shape[1], **QCFG)
    t = TrainConfig(epochs=1, batch_size=256, lr=3e-3, warmup_steps=5, rq_iters=4)
    model, _ = train_model(x, xv, q, t)
    return model.eval(), xv


def test_training_on_cuda_lowers_the_error_and_loads_on_cpu(codec_vectors, tmp_path):
    x, xv, _ = codec_vectors
    q = QincoConfig(dim=x.shape[1], **QCFG)
    t = TrainConfig(epochs=3, batch_size=256, lr=3e-3, warmup_steps=5, rq_iters=4)
    model, hist = train_model(x, xv, q, t, device="cuda")
    assert model.device.type == "cuda"
    assert min(h["val_mse"] for h in hist[1:]) < hist[0]["val_mse"]  # the epochs improved on RQ
    save_model(model, str(tmp_path / "m"))
    on_cpu = load_model(str(tmp_path / "m"))
    codes, lids = encode(on_cpu, xv)
    np.testing.assert_allclose(decode(model, codes, lids, device="cuda", precision="float32"),
                               decode(on_cpu, codes, lids), rtol=1e-4, atol=1e-3 * float(np.abs(xv).max()))


def test_encoding_on_cuda_matches_cpu(cpu_model):
    model, xv = cpu_model
    c_cpu, l_cpu = encode(model, xv)
    c_gpu, l_gpu = encode(model, xv, device="cuda")  # float16 network on CUDA by default
    assert model.device.type == "cpu"  # the encode ran on a copy of the model
    np.testing.assert_array_equal(l_cpu, l_gpu)
    assert (c_cpu == c_gpu).all(1).mean() > 0.8
    mse_cpu = reconstruction_mse(xv, decode(model, c_cpu, l_cpu))
    mse_gpu = reconstruction_mse(xv, decode(model, c_gpu, l_gpu))
    assert mse_gpu < 1.02 * mse_cpu


def test_decoding_and_row_scales_on_cuda_match_cpu(cpu_model):
    model, xv = cpu_model
    codes, lids = encode(model, xv)
    ref = Decoder(model, "float32")(codes, lids)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(Decoder(model, "float32", "cuda")(codes, lids), ref, atol=1e-4 * scale)
    for prec in ("float16", "bfloat16"):
        x16 = Decoder(model, prec, "cuda")(codes, lids)
        assert x16.dtype == np.float32 and np.abs(x16 - ref).max() < 0.05 * scale
    assert model.device.type == "cpu"
    s_cpu = model_row_scales(model, codes, lids)
    s_gpu = model_row_scales(model, codes, lids, device="cuda")
    np.testing.assert_allclose(s_gpu.astype(np.float32), s_cpu.astype(np.float32), rtol=2e-3)


def test_rerank_with_a_cuda_decoder_equals_cpu(cpu_model):
    from pipeline.codec.decoder import model_centroids, model_codebooks

    model, xv = cpu_model
    codes, lids = encode(model, xv)
    order = np.argsort(lids, kind="stable")
    codes, lids = codes[order], lids[order].astype(np.int32)
    shard = dict(list_ids_N=lids, ids_N=order.astype(np.int64), codes_NM=codes,
                 list_offsets=np.searchsorted(lids, np.arange(model.config.nlist + 1)).astype(np.int64),
                 centroids_LD=model_centroids(model), codebooks_MKD=model_codebooks(model))
    q = xv[:40] + np.random.default_rng(0).normal(0, 1, xv[:40].shape).astype(np.float32)
    params = SearchParams(k=10, nprobe=2, shortlist=50)
    D_c, I_c = ShardSearcher(**shard, decode_fn=Decoder(model, "float32")).search(q, params)
    on_gpu = Decoder(model, "float32", "cuda")  # on a copy of the model: the CPU decoder's stays
    assert on_gpu.model.device.type == "cuda" and model.device.type == "cpu"
    D_g, I_g = ShardSearcher(**shard, decode_fn=on_gpu).search(q, params)
    assert (I_c[:, 0] == I_g[:, 0]).mean() > 0.95
    np.testing.assert_allclose(D_g, D_c, rtol=1e-4, atol=1e-3)
