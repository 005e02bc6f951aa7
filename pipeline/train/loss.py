"""The training loss of a QINCo model, as a module so that ``DistributedDataParallel`` wraps it.

For raw vectors ``x_BD`` the codes are found without gradient by beam search (beam ``B``, default
``config.train_beam``, with pre-selection) and decoded with gradient. The loss is the sum over
steps of the per-element MSE of the partial reconstruction ``x̂ᵐ`` in normalised space, plus the
pre-selectors' own losses (each pre-selector codebook is fitted to the residual it pre-selects for).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.codec.beam_search import beam_search
from pipeline.codec.model import QINCo


class TrainingLoss(nn.Module):
    """``TrainingLoss(model)(x_BD, list_ids_B=None, B=None) -> dict``.

    Returns ``loss``, ``mse_per_step`` (``(M,)``, detached), ``presel_loss``, ``codes_BM``,
    ``xn_BD`` and ``xhat_prev_MBD`` (detached reconstruction before each step, for codeword
    resets) and ``list_ids_B`` (assigned on the model's device when not given).
    """

    def __init__(self, model: QINCo):
        super().__init__()
        self.model = model

    def forward(self, x_BD: Tensor, list_ids_B: Tensor | None = None, B: int | None = None) -> dict:
        model = self.model
        if model.ivf and list_ids_B is None:
            list_ids_B = model.assign_lists_tensor(x_BD)
        xn_BD = model.normalise(x_BD)
        xhat_BD = model.initial_xhat(x_BD.shape[0], list_ids_B)
        with torch.no_grad():
            codes_BM, _ = beam_search(model, xn_BD.detach(), xhat_BD.detach(),
                                      B=B or model.config.train_beam, A=model.config.A)
        mse, presel, prev = [], [], []
        for m, step in enumerate(model.steps):
            prev.append(xhat_BD.detach())
            codes_B = codes_BM[:, m]
            if step.has_presel:
                p = xhat_BD.detach() + step.presel_KD[codes_B]
                presel.append(((xn_BD - p) ** 2).mean())
            xhat_BD = xhat_BD + step.decode_codes(codes_B, xhat_BD)
            mse.append(((xn_BD - xhat_BD) ** 2).mean())
        mse_t = torch.stack(mse)
        presel_t = torch.stack(presel).sum() if presel else torch.zeros((), device=xn_BD.device)
        return {
            "loss": mse_t.sum() + presel_t,
            "mse_per_step": mse_t.detach(),
            "presel_loss": presel_t.detach(),
            "codes_BM": codes_BM,
            "xn_BD": xn_BD.detach(),
            "xhat_prev_MBD": torch.stack(prev),
            "list_ids_B": list_ids_B,
        }
