"""Model directories (local and S3), codes files, and the train -> encode -> decode CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.io import codes as codes_io, vectors
from pipeline.codec.model_file import load_model, model_identity, read_model_info, save_model
from pipeline.cli import main
from pipeline.codec.decoder import decode, reconstruction_mse
from pipeline.codec.encoder import encode
from pipeline.errors import CheckpointError, VectorFormatError
from pipeline.codec.model import QINCo, QincoConfig
from pipeline.codec.rq_init import init_from_rq
from pipeline.codec.ivf import IVFConfig, train_coarse_quantizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_data(codec_vectors):
    x, xv, _ = codec_vectors
    model = QINCo(QincoConfig(dim=x.shape[1], M=3, K=16, L=1, de=16, dh=32, A=4, B=2, nlist=4))
    model.set_normalisation(x)
    model.set_centroids(train_coarse_quantizer(x, IVFConfig(nlist=4, niter=3), progress=False))
    init_from_rq(model, x[:1000], niter=2)
    with torch.no_grad():  # make the networks non-trivial so a lost weight shows up in the codes
        for s in model.steps:
            s.out_proj.weight.normal_(0, 0.05)
    model.set_additive_codebooks(np.random.default_rng(0).normal(size=(3, 16, x.shape[1])))
    return model, xv[:300]


def _check_roundtrip(model, xv, uri):
    save_model(model, uri, metadata={"note": "test", "history": [{"epoch": 1, "val_mse": 1.5}]})
    loaded = load_model(uri)
    c1, l1 = encode(model, xv)
    c2, l2 = encode(loaded, xv)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(decode(model, c1, l1), decode(loaded, c1, l1))
    assert torch.equal(loaded.additive_MKD, model.additive_MKD)
    assert loaded.config == model.config
    info = read_model_info(uri)
    assert info["metadata"]["note"] == "test" and "code_version" in info
    ident = model_identity(uri)
    assert len(ident["weights_sha256"]) == 64


def test_save_load_local_gives_identical_codes(model_and_data, tmp_path):
    model, xv = model_and_data
    _check_roundtrip(model, xv, str(tmp_path / "m"))


@pytest.mark.s3
def test_save_load_s3_gives_identical_codes(model_and_data, s3):
    model, xv = model_and_data
    _check_roundtrip(model, xv, s3.bucket("qinco-models") + "/runs/m1")


def test_corrupt_missing_and_mismatched_checkpoints(model_and_data, tmp_path):
    model, _ = model_and_data
    with pytest.raises(CheckpointError, match="missing"):
        load_model(str(tmp_path / "nothing"))
    uri = str(tmp_path / "m")
    save_model(model, uri)
    before = model_identity(uri)
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(uri)
    save_model(model, uri)
    cfg = tmp_path / "m" / "config.json"
    info = json.loads(cfg.read_text())
    info["format_version"] = 99
    cfg.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(uri)
    info["format_version"] = 1
    info["config"]["dh"] = 64  # shapes no longer match the weights
    cfg.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(uri)
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(uri)
    save_model(model, uri)
    assert model_identity(uri)["weights_sha256"] == before["weights_sha256"]


def test_codes_file_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 300, (50, 4)).astype(np.uint16)
    lids = rng.integers(0, 7, 50)
    uri = str(tmp_path / "c.parquet")
    codes_io.write_codes(uri, codes, 300, lids, ids_N=np.arange(100, 150), model={"weights_sha256": "x"})
    d = codes_io.read_codes(uri)
    np.testing.assert_array_equal(d.codes, codes)
    np.testing.assert_array_equal(d.list_ids, lids)
    np.testing.assert_array_equal(d.ids, np.arange(100, 150))
    assert d.codes.dtype == np.uint16 and d.meta["M"] == 4 and d.meta["model"]["weights_sha256"] == "x"
    codes_io.write_codes(uri, codes[:, :2].astype(np.uint8) % 200, 256)
    assert codes_io.read_codes(uri).list_ids is None
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(VectorFormatError, match="bad.parquet"):
        codes_io.read_codes(str(tmp_path / "bad.parquet"))


def test_cli_train_encode_decode_roundtrip(codec_vectors, tmp_path, capsys):
    x, xv, _ = codec_vectors
    data = str(tmp_path / "train.fvecs")
    vectors.write_vectors(data, x[:1200])
    query = str(tmp_path / "q.fvecs")
    vectors.write_vectors(query, xv[:200])
    model_uri = str(tmp_path / "model")
    rc = main(["train", "--data", data, "--out", model_uri, "--M", "2", "--K", "16", "--L", "1",
               "--de", "16", "--dh", "16", "--A", "4", "--B", "2", "--epochs", "1", "--val", "200",
               "--batch-size", "256"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch 1:" in out and "samples/s" in out and "val MSE" in out
    info = read_model_info(model_uri)
    data = info["metadata"]["data"]
    # the hash-band split of both trainers: 200 validation rows, the training band after the
    # validation band (the band's rows beyond the 200 train nothing)
    assert data["val_rows"] == 200 and 850 <= data["train_rows"] <= 1000
    assert len(info["metadata"]["history"]) == 2
    # no --lr: the cpu preset's rate; Faiss RQ (beam 5) initialisation; recorded with the model
    tc = info["metadata"]["train_config"]
    assert tc["lr"] == 1e-2 and tc["rq_beam"] == 5 and tc["lr_schedule"] == "steps"
    report = json.loads(open(tmp_path / "model" / "report.json").read())
    assert report["job"] == "train" and report["epochs_done"] == 1 and report["timings_s"]["train"] > 0
    assert report["best_val_mse"] == min(h["val_mse"] for h in info["metadata"]["history"])
    codes_uri = str(tmp_path / "codes.parquet")
    assert main(["encode", "--model", model_uri, "--data", query, "--out", codes_uri, "--block-rows", "64"]) == 0
    rec_uri = str(tmp_path / "rec.fvecs")
    assert main(["decode", "--model", model_uri, "--codes", codes_uri, "--out", rec_uri]) == 0
    rec = vectors.read_vectors(rec_uri)
    model = load_model(model_uri)
    codes, _ = encode(model, xv[:200])
    np.testing.assert_array_equal(codes_io.read_codes(codes_uri).codes, codes)
    np.testing.assert_allclose(rec, decode(model, codes), rtol=1e-6)
    assert reconstruction_mse(xv[:200], rec) < reconstruction_mse(xv[:200], np.broadcast_to(x.mean(0), (200, x.shape[1])))
    # a prefix decodes worse than the full codes
    pre_uri = str(tmp_path / "pre.fvecs")
    assert main(["decode", "--model", model_uri, "--codes", codes_uri, "--out", pre_uri, "--prefix", "1"]) == 0
    assert reconstruction_mse(xv[:200], vectors.read_vectors(pre_uri)) > reconstruction_mse(xv[:200], rec)
    # bad input: a clear error and a non-zero exit, no output written
    assert main(["encode", "--model", str(tmp_path / "none"), "--data", query, "--out", str(tmp_path / "x.parquet")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
