"""Beam search over the M steps of a QINCo model, with candidate pre-selection.

At each step every beam entry proposes candidates: all K codewords for a plain step, or for a
network step the ``A`` codewords of the cheap pre-selector codebook nearest to the residual
(``A = 0`` or ``A >= K``: all K, in code order). Candidates go through the step network, the
``B`` best partial reconstructions over all beam entries are kept, and the best final one
gives the codes (``B = 1``: greedy).

Lookup-table-aware choice (``lut_weight`` λ > 0): the final one is instead the beam entry with
the least ``||x - x̂||² + λ ||x - x̃||²``, where ``x̃ = c_l + a r`` is the additive decoder's
reconstruction of the entry's codes (``r = Σ_m C_m[code_m]``, ``a`` its least-squares row scale):
the search's lookup-table stage ranks codes by ``x̃``, so codes whose ``x̃`` is nearer ``x`` are
ranked more accurately, at a small cost in the neural decoder's error.

Cost: everything that depends only on the codeword is computed once per model
(:class:`StepTables`: first-layer table, ``Wᵀc`` and ``WᵀW`` of the output projection, norms),
so a candidate costs its residual blocks plus ``de²`` multiply-adds: its distance
``||r - c - W z||²`` is expanded into ``||r - c||² + z·(WᵀW z - 2Wᵀr + 2Wᵀc)`` and the
``D``-dimensional codeword is only formed for the ``B`` kept candidates. Vectors are processed
in chunks sized to stay in cache (:func:`auto_batch_size`); a vector's codes do not depend on
the rest of its batch.

Used by training (codes of each batch, found without gradient) and by :mod:`pipeline.codec.encoder`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.codec.additive import least_squares_scale
from pipeline.codec.model import QINCo
from pipeline.errors import ConfigError

# Bytes allowed for the per-chunk candidate tensors (network activations over B x A x width).
CANDIDATE_BUDGET_BYTES = 256 << 20
# The same on CPU, sized to stay in the caches (vectors are processed chunk by chunk).
CACHE_BUDGET_BYTES = 16 << 20



def _gather_rows(t_NF_: Tensor, idx_NG: Tensor) -> Tensor:
    """``t[n, idx[n, g]]`` for a tensor with leading dims (N, F, ...)."""
    n = torch.arange(t_NF_.shape[0], device=t_NF_.device)[:, None]
    return t_NF_[n, idx_NG]


class StepTables:
    """Quantities of one step shared by every vector (computed once per model, or per batch in
    training).

    ``ref_RD`` holds the rows whose dot products with the residual are needed (the pre-selector
    codebook then the codebook, ``(2K, D)``; only the codebook without pre-selector) and
    ``ref_sq_R`` their squared norms. For a network step, ``cand_KF`` holds per codeword the
    first-layer input :meth:`QincoStep.codeword_table` (``E`` columns) followed, for QINCo2, by
    ``2 Wᵀc`` (``W = out_proj``, ``E`` more columns), and ``gram_EE = WᵀW``. With
    ``f = c + W z`` the candidate distance is ``||r - c||² + z·(G z - 2 Wᵀr + 2 Wᵀc)``, so a
    candidate costs ``E²`` instead of ``E·D`` multiply-adds after the blocks and the
    ``D``-dimensional codeword is only formed for the candidates kept in the beam.
    """

    def __init__(self, step, table_KE: Tensor | None = None):
        c_KD = step.codebook_KD.detach().float()
        self.plain = step.plain
        self.has_presel = step.has_presel
        self.K, self.D = c_KD.shape
        self.codebook_KD = c_KD.contiguous()
        ref = torch.cat([step.presel_KD.detach().float(), c_KD]) if step.has_presel else c_KD
        self.ref_RD = ref.contiguous()
        self.ref_sq_R = (ref * ref).sum(1)
        self.cand_KF = self.gram_EE = self.out_DE = None
        self.E = 0
        if step.plain:
            return
        tab = (step.codeword_table() if table_KE is None else table_KE).detach()
        self.E = tab.shape[1]
        if step.variant == "qinco2":
            W_DE = step.out_proj.weight.detach().float()
            with torch.autocast(c_KD.device.type, enabled=False):
                self.out_DE = W_DE.contiguous()
                self.gram_EE = (W_DE.T @ W_DE).contiguous()
                self.cand_KF = torch.cat([tab.float(), 2 * (c_KD @ W_DE)], 1).contiguous()
        else:
            self.cand_KF = tab.float().contiguous()


def step_tables(model: QINCo, tables: list | None = None) -> list[StepTables]:
    """:class:`StepTables` of every step (``tables``: optional precomputed codeword tables)."""
    out = []
    for m, step in enumerate(model.steps):
        t = None if tables is None else tables[m]
        out.append(t if isinstance(t, StepTables) else StepTables(step, t))
    return out


def _run_blocks(step, z_XE: Tensor) -> Tensor:
    """The step's residual blocks on a 2-d activation, updated in place (no autograd)."""
    for blk in step.blocks:
        h_XH = torch.relu_(z_XE @ blk.up.weight.T)
        if h_XH.dtype == z_XE.dtype:
            z_XE = z_XE.addmm_(h_XH, blk.down.weight.T)
        else:
            z_XE = z_XE + h_XH @ blk.down.weight.T
    return z_XE


def _search_step(step, st: StepTables, xn_ND: Tensor, xhat_NFD: Tensor, codes_NFm: Tensor,
                 B: int, A: int) -> tuple[Tensor, Tensor]:
    """One beam-search step: ``(xhat_NGD, codes_NGm)`` of the ``G = min(B, F·A)`` best."""
    N, F, D = xhat_NFD.shape
    K, X = st.K, N * F
    r_XD = (xn_ND[:, None, :] - xhat_NFD).reshape(X, D).float()
    r_sq_X = (r_XD * r_XD).sum(1, keepdim=True)
    with torch.autocast(r_XD.device.type, enabled=False):  # expanded distances need float32
        dots_XR = r_XD @ st.ref_RD.T
    # ||r - c||² for every codeword, by expansion
    cdist_XK = (st.ref_sq_R[-K:] - 2 * dots_XR[:, -K:]) + r_sq_X
    idx_XA = None
    zsel_NCE = None
    if st.plain:
        Ae, dist_XA = K, cdist_XK
    else:
        E = st.E
        if st.has_presel and 0 < A < K:
            pd_XK = st.ref_sq_R[:K] - 2 * dots_XR[:, :K]
            idx_XA = pd_XK.topk(A, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
            Ae = A
            cand_XAF = st.cand_KF[idx_XA]
            base_XA = cdist_XK.gather(1, idx_XA)
        else:
            Ae = K
            cand_XAF = st.cand_KF[None].expand(X, K, st.cand_KF.shape[1])
            base_XA = cdist_XK
        ctx_XE = step.context(xhat_NFD.reshape(X, D))
        z_XAE = cand_XAF[:, :, :E] + ctx_XE[:, None, :]
        z_YE = _run_blocks(step, z_XAE.reshape(X * Ae, E))
        with torch.autocast(r_XD.device.type, enabled=False):
            zf_XAE = z_YE.float().view(X, Ae, E)
            if st.gram_EE is not None:
                q_XAE = (zf_XAE.view(X * Ae, E) @ st.gram_EE).view(X, Ae, E)
                q_XAE += cand_XAF[:, :, E:].float()
                q_XAE -= (2 * (r_XD @ st.out_DE))[:, None, :]
            else:
                q_XAE = zf_XAE - 2 * r_XD[:, None, :]
            dist_XA = torch.einsum("xae,xae->xa", q_XAE, zf_XAE)
            dist_XA += base_XA if st.gram_EE is not None else r_sq_X
        zsel_NCE = z_YE.view(N, F * Ae, E)
    G = min(B, F * Ae)
    sel_NG = dist_XA.reshape(N, F * Ae).topk(G, dim=1, largest=False).indices
    parent_NG = torch.div(sel_NG, Ae, rounding_mode="floor")
    if idx_XA is None:
        code_NG = sel_NG - parent_NG * Ae
    else:
        code_NG = idx_XA.reshape(N, F * Ae).gather(1, sel_NG)
    if zsel_NCE is None:
        f_NGD = st.codebook_KD[code_NG]
    else:
        z_NGE = _gather_rows(zsel_NCE, sel_NG).float()
        if st.out_DE is not None:
            with torch.autocast(z_NGE.device.type, enabled=False):
                f_NGD = st.codebook_KD[code_NG] + z_NGE @ st.out_DE.T
        else:
            f_NGD = z_NGE
    xhat_NGD = _gather_rows(xhat_NFD, parent_NG).float() + f_NGD
    codes_NGm = torch.cat([_gather_rows(codes_NFm, parent_NG), code_NG[:, :, None]], dim=2)
    return xhat_NGD, codes_NGm


class LutChoice:
    """Chooses the final beam entry by ``||x - x̂||² + λ ||x - x̃||²`` (see the module docstring).

    Works in the beam search's normalised space: the additive codebooks (raw-space residual
    codewords) are divided by the model's scale, and the residual starts from the normalised list
    centroid (the beam's start) or, without IVF, from the normalised origin (the additive decoder
    of a flat model has no centroid); the row scale is the search's
    (:func:`pipeline.codec.additive.least_squares_scale`).
    """

    def __init__(self, model: QINCo, lut_weight: float):
        self.check(lut_weight, model.additive_MKD.shape[0] > 0)
        self.weight = float(lut_weight)
        self.cb_MKD = (model.additive_MKD.float() / model.scale.float()).contiguous()
        self.origin_D = None if model.ivf else model.normalise(torch.zeros(1, model.config.dim,
                                                                           device=model.device))[0].float()

    @staticmethod
    def check(lut_weight: float, has_additive: bool) -> None:
        """ConfigError unless ``lut_weight`` is usable with a model that has (or lacks) additive
        codebooks: what an encode job checks, from the model file alone, before any work."""
        if not lut_weight >= 0:
            raise ConfigError(f"lut_weight must be >= 0, got {lut_weight}")
        if lut_weight and not has_additive:
            raise ConfigError("lut_weight needs the model's additive (lookup-table) codebooks, which this "
                              "model has none of (fit them with training's fit_additive)")

    def choose(self, xn_ND: Tensor, xhat0_ND: Tensor, xhat_NFD: Tensor, codes_NFm: Tensor) -> Tensor:
        """Index (``(N,)``) of the chosen entry of each vector's final beam."""
        N, F, D = xhat_NFD.shape
        codes = codes_NFm.long()
        r_NFD = torch.zeros_like(xhat_NFD, dtype=torch.float32)
        for m in range(codes.shape[2]):
            r_NFD += self.cb_MKD[m][codes[:, :, m]]
        base_ND = xhat0_ND.float() if self.origin_D is None else self.origin_D.expand(N, D)
        a_NF = least_squares_scale(r_NFD, xhat_NFD.float() - base_ND[:, None, :])
        xt_NFD = base_ND[:, None, :] + a_NF[:, :, None] * r_NFD
        x_N1D = xn_ND.float()[:, None, :]
        err_NF = ((x_N1D - xhat_NFD.float()) ** 2).sum(2) + self.weight * ((x_N1D - xt_NFD) ** 2).sum(2)
        return err_NF.argmin(dim=1)


def beam_search(model: QINCo, xn_ND: Tensor, xhat0_ND: Tensor, B: int, A: int,
                tables: list | None = None, chunk: int | None = None,
                lut_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Codes (``(N, M)`` int64) and reconstruction (normalised) of normalised vectors ``xn``.

    ``xhat0`` is the starting reconstruction (zeros, or the list centroid with IVF). ``tables``
    optionally holds precomputed per-step tables (:func:`step_tables`, or
    :meth:`QincoStep.codeword_table` results). Vectors are processed ``chunk`` at a time
    (default :func:`auto_batch_size`) so the candidate activations stay in cache; each vector's
    codes do not depend on the other vectors. ``lut_weight`` λ > 0 chooses the final beam entry
    with the lookup-table term (:class:`LutChoice`).
    """
    N = xn_ND.shape[0]
    B = max(1, int(B))
    sts = step_tables(model, tables)
    lut = LutChoice(model, lut_weight) if lut_weight else None
    chunk = chunk or auto_batch_size(model, B, A)
    codes_out, xhat_out = [], []
    for i in range(0, max(N, 1), chunk):
        xn = xn_ND[i:i + chunk].float()
        xhat_NFD = xhat0_ND[i:i + chunk, None, :].float()
        codes_NFm = torch.zeros(xn.shape[0], 1, 0, dtype=torch.long, device=xn_ND.device)
        for step, st in zip(model.steps, sts):
            xhat_NFD, codes_NFm = _search_step(step, st, xn, xhat_NFD, codes_NFm, B, A)
        # topk returns sorted candidates: entry 0 of the last step is the best final one
        if lut is None:
            codes_out.append(codes_NFm[:, 0, :])
            xhat_out.append(xhat_NFD[:, 0, :])
        else:
            j_N = lut.choose(xn, xhat0_ND[i:i + chunk], xhat_NFD, codes_NFm)
            n_N = torch.arange(xn.shape[0], device=xn.device)
            codes_out.append(codes_NFm[n_N, j_N])
            xhat_out.append(xhat_NFD[n_N, j_N])
    if len(codes_out) == 1:
        return codes_out[0], xhat_out[0]
    return torch.cat(codes_out), torch.cat(xhat_out)



def auto_batch_size(model: QINCo, B: int, A: int | None) -> int:
    """Vectors per chunk so the candidate activations of one step stay under
    ``CACHE_BUDGET_BYTES`` on CPU (in cache) or ``CANDIDATE_BUDGET_BYTES`` on GPU."""
    c = model.config
    E = c.de if c.variant == "qinco2" else c.dim
    H = c.dh if c.variant == "qinco2" else c.h
    per_cand = 4 * (4 * E + H)
    cands = max(B, 1) * max(c.effective_A if A is None else (A if 0 < A < c.K else c.K), 1)
    per_vec = max(per_cand * cands, 4 * 3 * c.K * max(B, 1))  # network or distance tables
    budget = CANDIDATE_BUDGET_BYTES if model.device.type == "cuda" else CACHE_BUDGET_BYTES
    return int(max(16, min(65536, budget // per_vec)))

