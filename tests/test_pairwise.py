"""The pairwise decoder: its fit, its storage with the model, and the search's pairwise stage."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.codec.additive import decode_additive
from pipeline.codec.decoder import Decoder, decode, model_centroids, model_codebooks, model_pairwise
from pipeline.codec.encoder import encode
from pipeline.codec.model import QincoConfig
from pipeline.codec.model_file import load_model, read_model_info, save_model
from pipeline.codec.pairwise import PairwiseDecoder, decode_pairwise, fit_pairwise, table_bytes
from pipeline.errors import CheckpointError, ConfigError
from pipeline.search.params import SearchParams
from pipeline.search.pipeline import finish
from pipeline.search.rerank import rerank
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train_model


def _mse(a, b):
    return float(((np.asarray(a, np.float64) - b) ** 2).sum(1).mean())


@pytest.fixture(scope="module")
def trained(codec_vectors):
    """A small IVF-QINCo2 model trained for a few epochs (so its steps are not additive), with the
    decoders ``qinco train`` fits."""
    x_train, x_held, name = codec_vectors
    qcfg = QincoConfig(dim=x_train.shape[1], M=4, K=16, L=1, de=32, dh=64, A=4, B=4, nlist=4)
    tcfg = TrainConfig(epochs=4, batch_size=256, lr=3e-3, warmup_steps=5, rq_iters=4, val_size=300)
    model, _ = train_model(x_train[300:], x_train[:300], qcfg, tcfg)
    return model, x_train[300:], x_held, name


def _held_out(trained):
    model, _, x_held, name = trained
    pw = model_pairwise(model)
    assert pw is not None and 1 <= pw.pairs <= model.config.M
    codes, lists = encode(model, x_held)
    additive = decode_additive(model_codebooks(model), codes, lists, model_centroids(model))
    return x_held, decode(model, codes, lists), additive, pw(codes, lists), name


def test_pairwise_decoder_is_closer_to_qinco_than_the_additive_decoder_on_held_out_rows(trained):
    _, xhat, additive, pairwise, name = _held_out(trained)
    assert _mse(xhat, pairwise) < 0.95 * _mse(xhat, additive), name


def test_pairwise_decoder_beats_the_additive_decoder_on_held_out_rows_of_real_data(trained):
    """The MSE to the vectors themselves on a small real sample (dwsift). On the synthetic stand-in
    the QINCo steps model noise, and what moves towards them need not move towards the vectors."""
    x_held, _, additive, pairwise, name = _held_out(trained)
    if name != "dwsift":
        pytest.skip("needs the dwsift dataset (QINCO_DATA_DIR)")
    assert _mse(x_held, pairwise) < _mse(x_held, additive)


def test_pairwise_decoding_is_the_same_in_any_batch(trained):
    model, _, x_held, _ = trained
    pw = model_pairwise(model)
    codes, lists = encode(model, x_held[:200])
    whole = pw(codes, lists)
    parts = np.concatenate([pw(codes[a:a + 7], lists[a:a + 7]) for a in range(0, 200, 7)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(pw(codes[::-1], lists[::-1]), whole[::-1])


def test_fit_picks_a_pair_that_carries_an_interaction_and_none_without_one():
    """Targets with a term in codes (0, 2) jointly: the fit takes that pair first and recovers the
    term; additive targets get no pair (no pair lowers the held-out residual)."""
    rng = np.random.default_rng(0)
    N, M, K, D = 6000, 3, 8, 5
    codes = rng.integers(0, K, (N, M))
    A = rng.normal(size=(M, K, D)).astype(np.float32)
    inter = rng.normal(size=(K * K, D)).astype(np.float32)
    additive_target = decode_additive(A, codes)
    pairs, tables = fit_pairwise(codes, additive_target + inter[codes[:, 0] * K + codes[:, 2]], K, A)
    assert pairs[0].tolist() == [0, 2] and tables.dtype == np.float16
    assert np.abs(tables[0].astype(np.float32) - inter).max() < 0.05 * np.abs(inter).max()
    pairs, tables = fit_pairwise(codes, additive_target, K, A)
    assert pairs.shape == (0, 2) and tables.shape == (0, K * K, D)
    # the byte budget bounds the number of pairs
    pairs, _ = fit_pairwise(codes, additive_target + inter[codes[:, 0] * K + codes[:, 2]]
                            + inter[codes[:, 1] * K + codes[:, 2]], K, A, max_bytes=table_bytes(K, D))
    assert len(pairs) == 1


def test_pairwise_decoder_is_saved_with_the_model_and_old_files_load_without_it(trained, tmp_path):
    model, _, x_held, _ = trained
    save_model(model, str(tmp_path / "m"))
    info = read_model_info(str(tmp_path / "m"))
    assert info["pairwise_pairs"] == model.pairwise_pairs_P2.shape[0] >= 1
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.pairwise_PQD.dtype == model.pairwise_PQD.dtype
    codes, lists = encode(model, x_held[:50])
    np.testing.assert_array_equal(model_pairwise(loaded)(codes, lists), model_pairwise(model)(codes, lists))
    # a model without pairs (as files written before the pairwise decoder) has no pairwise stage
    loaded.set_pairwise(np.zeros((0, 2)), np.zeros((0, 16 * 16, model.config.dim)))
    save_model(loaded, str(tmp_path / "none"))
    assert model_pairwise(load_model(str(tmp_path / "none"))) is None
    with pytest.raises(ConfigError, match="pair positions"):
        loaded.set_pairwise(np.array([[0, 4]]), np.zeros((1, 256, model.config.dim)))


def test_the_fixture_written_before_the_pairwise_decoder_loads_without_it():
    import pathlib
    m = load_model(str(pathlib.Path(__file__).parent / "fixtures" / "written-by-0.1.0" / "model"))
    assert m.pairwise_pairs_P2.shape == (0, 2) and model_pairwise(m) is None


def test_mismatched_pair_tensors_are_refused(trained, tmp_path):
    import hashlib
    import json
    from safetensors.torch import load, save

    model, _, _, _ = trained
    save_model(model, str(tmp_path / "m"))
    blob = (tmp_path / "m" / "model.safetensors").read_bytes()
    t = load(blob)
    t["pairwise_pairs_P2"] = t["pairwise_pairs_P2"][:0]
    bad = save(t, metadata={"format": "qinco-model/1"})
    (tmp_path / "m" / "model.safetensors").write_bytes(bad)
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    info["weights"]["sha256"] = hashlib.sha256(bad).hexdigest()
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="pairwise"):
        load_model(str(tmp_path / "m"))


def test_pairwise_stage_keeps_the_best_of_the_shortlist_by_the_pairwise_decoder(trained):
    """``finish`` with the pairwise stage: its ranking is ``rerank`` with the pairwise decoder; the
    QINCo re-rank then sees only its best; with every candidate kept it changes nothing."""
    model, x_train, x_held, _ = trained
    codes, lists = encode(model, x_train[:400])
    rng = np.random.default_rng(1)
    Q, S = 20, 30
    q = x_held[:Q]
    cols = np.stack([rng.choice(400, S, replace=False) for _ in range(Q)])
    ids = cols.astype(np.int64)
    ids[:, -3:] = -1  # padding candidates
    merged = (np.zeros((Q, S), np.float32), ids, codes[cols], np.where(ids < 0, -1, lists[cols]))
    dec, pw = Decoder(model), model_pairwise(model)
    full = finish(dec, q, merged, SearchParams(k=5, shortlist=S), pw)
    same = finish(dec, q, merged, SearchParams(k=5, shortlist=S, pairwise=S), pw)
    np.testing.assert_array_equal(full[1], same[1])
    D_pw, I_pw = rerank(pw, q, merged[1], merged[2], merged[3], 8)
    only_pw = finish(dec, q, merged, SearchParams(k=5, shortlist=S, pairwise=8, rerank=0), pw)
    np.testing.assert_array_equal(only_pw[1], I_pw[:, :5])
    np.testing.assert_array_equal(only_pw[0], D_pw[:, :5])
    # the QINCo re-rank of the pairwise stage's best 8: the exact top of those 8
    codes_pw, lists_pw = _gather(merged, I_pw)
    _, I_ex = rerank(dec, q, I_pw, codes_pw, lists_pw, 5)
    both = finish(dec, q, merged, SearchParams(k=5, shortlist=S, pairwise=8), pw)
    np.testing.assert_array_equal(both[1], I_ex)
    with pytest.raises(ConfigError, match="no pairwise decoder"):
        finish(dec, q, merged, SearchParams(k=5, shortlist=S, pairwise=8), None)


def _gather(merged, I_QX):
    """Codes and lists of the candidates ``I_QX`` (ids) of ``merged``."""
    ids, codes, lists = merged[1], merged[2], merged[3]
    pos = np.array([[list(row).index(i) for i in sel] for row, sel in zip(ids, I_QX)])
    return (np.take_along_axis(codes, pos[..., None], axis=1), np.take_along_axis(lists, pos, axis=1))


def test_search_params_bound_the_pairwise_stage():
    SearchParams(k=5, shortlist=40, pairwise=10, rerank=10).validate()
    assert SearchParams(k=5, shortlist=40, pairwise=10).reranked == 10
    assert SearchParams(k=5, shortlist=40, pairwise=10, rerank=0).candidates == 40
    with pytest.raises(ConfigError, match="pairwise"):
        SearchParams(k=5, shortlist=40, pairwise=50).validate()
    with pytest.raises(ConfigError, match="pairwise"):
        SearchParams(k=5, shortlist=40, pairwise=4).validate()
    with pytest.raises(ConfigError, match="pairwise stage's shortlist"):
        SearchParams(k=5, shortlist=40, pairwise=10, rerank=20).validate()


def test_pairwise_decoder_refuses_tables_of_the_wrong_shape():
    A = np.zeros((3, 4, 2), np.float32)
    with pytest.raises(ConfigError, match="pair tables"):
        PairwiseDecoder(A, np.array([[0, 1]]), np.zeros((1, 8, 2), np.float16))
    np.testing.assert_array_equal(decode_pairwise(A, np.zeros((0, 2)), np.zeros((0, 16, 2)), np.zeros((2, 3), int)),
                                  np.zeros((2, 2)))
