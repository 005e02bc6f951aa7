"""What both trainers share: which rows train and validate, how a model is set up before the
loop, and how its search decoders (additive, pairwise) are fitted after it.

The split rule: every row has a value ``u = hash01(global id, seed)`` (:mod:`pipeline.io.inputs`).
Rows with ``u < val_fraction`` form the validation band (its ``val_size`` smallest ``u`` are
the validation set), the band after it the training rows (``max_train`` of them or all), and the
``init_rows`` smallest ``u`` of the training band initialise the model (normalisation, IVF
k-means, RQ codebooks, the additive decoder). The in-process trainer reads these rows with
``sample_rows_local``, the Ray Train workers stream the training band with Ray Data: the same rows
either way, so ``qinco train --workers 0`` and ``--workers 1`` train on the same data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codec.additive import fit_additive_decoder
from pipeline.codec.decoder import decode
from pipeline.codec.encoder import assign_lists, encode
from pipeline.codec.ivf import IVFConfig, imbalance_factor, train_coarse_quantizer
from pipeline.codec.model import QINCo, QincoConfig
from pipeline.codec.pairwise import fit_pairwise
from pipeline.codec.rq_init import init_from_rq
from pipeline.config import JsonConfig
from pipeline.errors import ConfigError
from pipeline.io.inputs import InputFile, RowSample, band_fraction, sample_rows_local
from pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)

# Rows of the training band that set the model up (normalisation, k-means, RQ, additive decoder).
INIT_ROWS = 100_000


@dataclass
class SplitPlan(JsonConfig):
    """The hash bands of one training run over ``total`` rows (see the module docstring)."""

    total: int
    seed: int
    val_fraction: float
    train_fraction: float
    init_fraction: float
    n_val: int
    n_init: int | None  # None: every row of the initialisation band

    def samples(self) -> tuple[RowSample, RowSample]:
        """The (training, validation) samples: disjoint bands of the same hash."""
        return RowSample.pair(self.train_fraction, self.val_fraction, seed=self.seed)

    def init_sample(self) -> RowSample:
        return RowSample(self.init_fraction, self.seed, "train", self.val_fraction)

    @property
    def n_train_estimate(self) -> int:
        return int(round(self.train_fraction * self.total))


def plan_split(total: int, tcfg: TrainConfig, init_rows: int = INIT_ROWS) -> SplitPlan:
    """The bands for ``total`` rows: ``tcfg.val_size`` validation rows, ``tcfg.max_train`` (or all
    other) training rows, ``init_rows`` of them for the initialisation."""
    if total <= tcfg.val_size:
        raise ConfigError(f"{total} vectors in all; need more than the {tcfg.val_size} validation vectors")
    val_frac = band_fraction(tcfg.val_size, total)
    want_train = min(tcfg.max_train or total, total)
    train_frac = min(1.0 - val_frac, band_fraction(want_train, total) if tcfg.max_train else 1.0)
    n_init: int | None = min(init_rows, want_train)
    init_frac = min(train_frac, band_fraction(n_init, total))
    if init_frac >= train_frac:
        n_init = None  # the whole training band
    return SplitPlan(total=total, seed=tcfg.seed, val_fraction=val_frac, train_fraction=train_frac,
                     init_fraction=init_frac, n_val=tcfg.val_size, n_init=n_init)


def read_split_local(inputs: list[InputFile], plan: SplitPlan, options=None,
                     train: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x_val, x_init, x_train)`` of the plan read in this process, float32 in global id order
    (``x_train`` None unless ``train``)."""
    train_s, val_s = plan.samples()
    x_val = sample_rows_local(inputs, n=plan.n_val, sample=val_s, options=options).astype(np.float32)
    x_init = sample_rows_local(inputs, n=plan.n_init, sample=plan.init_sample(), options=options).astype(np.float32)
    x_train = None
    if train:
        x_train = sample_rows_local(inputs, sample=train_s, options=options).astype(np.float32)
    if len(x_val) == 0 or len(x_init) == 0:
        raise ConfigError(f"too few vectors for a training and a validation sample ({plan.total} in all)")
    return x_val, x_init, x_train


def rows_not_in(x_ND: np.ndarray, x_ref_RD: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``x_ND`` that equal no row of ``x_ref_RD`` (bit for bit, as
    float32), e.g. training rows from the files being indexed that repeat a validation row."""
    x = np.ascontiguousarray(x_ND, dtype=np.float32)
    ref = {r.tobytes() for r in np.ascontiguousarray(x_ref_RD, dtype=np.float32)}
    return np.fromiter((r.tobytes() not in ref for r in x), dtype=bool, count=len(x))


def sample_extra_rows(inputs: list[InputFile], x_val_VD: np.ndarray, n: int | None, seed: int,
                      options=None) -> tuple[np.ndarray, dict]:
    """Training rows drawn from other files (``qinco train --sample-from``, e.g. the files to be
    indexed): the ``n`` rows of smallest hash (all rows when ``n`` is None), streamed, without the
    rows equal to a validation row. Returns the rows (float32) and what was drawn."""
    total = sum(i.count for i in inputs)
    x = sample_rows_local(inputs, n=n if n is not None and n < total else None,
                          sample=RowSample(1.0, seed, "all"), options=options)
    keep = rows_not_in(x, x_val_VD)
    info = {"rows_in_files": int(total), "sampled": int(len(x)),
            "dropped_equal_to_validation": int((~keep).sum())}
    if not keep.all():
        log.info("dropped %d sampled rows equal to a validation row", info["dropped_equal_to_validation"])
    return np.ascontiguousarray(x[keep], dtype=np.float32), info


def init_model(qcfg: QincoConfig, tcfg: TrainConfig, x_init_ND: np.ndarray, ivf_niter: int = 20,
               centroids_LD: np.ndarray | None = None, device: str | torch.device = "cpu") -> QINCo:
    """A model ready for the loop: normalisation, IVF centroids (k-means on ``x_init`` unless
    given) and RQ codebooks, all from ``x_init``."""
    x_init_ND = np.asarray(x_init_ND, dtype=np.float32)
    model = QINCo(qcfg).to(device)
    model.set_normalisation(x_init_ND)
    lids = None
    if qcfg.nlist:
        if centroids_LD is None:
            if len(x_init_ND) < qcfg.nlist:
                raise ConfigError(f"IVF nlist={qcfg.nlist} needs at least that many training vectors; "
                                  f"the initialisation sample has {len(x_init_ND)}")
            centroids_LD = train_coarse_quantizer(x_init_ND, IVFConfig(nlist=qcfg.nlist, niter=ivf_niter,
                                                                        seed=tcfg.seed), progress=False)
        model.set_centroids(centroids_LD)
        lids = assign_lists(model, x_init_ND)
        # search cost grows with the imbalance of the lists (1.0: all lists equally long)
        log.info("IVF: %d lists, imbalance factor %.2f on %d vectors", qcfg.nlist,
                 imbalance_factor(lids, qcfg.nlist), len(x_init_ND))
    init_from_rq(model, x_init_ND, lids, max_points=tcfg.rq_max_points, niter=tcfg.rq_iters, seed=tcfg.seed,
                 beam=tcfg.rq_beam)
    return model


def fit_decoder(model: QINCo, x_ND: np.ndarray, tcfg: TrainConfig, device: str | torch.device = "cpu") -> None:
    """Fit and store the search's decoders on the codes of the first ``tcfg.additive_max_rows``
    rows of ``x_ND``: the least-squares additive decoder, then the pairwise decoder on top of it
    (fitted to those rows' QINCo reconstructions). A no-op unless ``tcfg.fit_additive``."""
    if not tcfg.fit_additive:
        return
    xa = np.asarray(x_ND[:tcfg.additive_max_rows], dtype=np.float32)
    codes, lids = encode(model, xa, device=device, source="training data")
    cent = model.centroids_LD.cpu().numpy() if model.ivf else None
    additive = fit_additive_decoder(codes, xa, model.config.K, lids, cent, ridge=tcfg.ridge)
    model.set_additive_codebooks(additive)
    if tcfg.pairwise_pairs != 0:
        t = time.perf_counter()
        pairs, tables = fit_pairwise(codes, decode(model, codes, lids, device=device), model.config.K, additive,
                                     lids, cent, max_pairs=tcfg.pairwise_pairs, max_bytes=tcfg.pairwise_max_bytes,
                                     seed=tcfg.seed)
        model.set_pairwise(pairs, tables)
        log.info("pairwise decoder: %d pairs, %.1f MB of tables, fitted on %d rows in %.1f s", len(pairs),
                 tables.nbytes / 1e6, len(codes), time.perf_counter() - t)
