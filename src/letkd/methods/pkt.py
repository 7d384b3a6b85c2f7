"""``pkt``: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018.

``L = ce_weight · CE + weight · mean_ij p^t_ij log(p^t_ij / p^s_ij)``, where ``p_ij`` are the
cosine-kernel conditional probabilities of the batch's pooled embeddings
(:func:`letkd.methods.losses.pkt_loss`).

Defaults: tap ``penultimate`` global-average-pooled (RepDistiller uses the pooled ``feat[-1]``),
``weight = 30000`` (RepDistiller README ``-b 30000``; mdistiller PKT FEAT_WEIGHT 30000),
``ce_weight = 1``, ``eps = 1e-7`` (authors' code in RepDistiller ``PKT.cosine_similarity_loss``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import embedding, pkt_loss


@dataclass
class PKTParams:
    tap: str = "penultimate"      # pooled to a vector (RepDistiller feat[-1])
    teacher_tap: str = ""         # empty: same name as ``tap``
    weight: float = 30000.0       # RepDistiller -b 30000; mdistiller PKT FEAT_WEIGHT 30000
    ce_weight: float = 1.0
    eps: float = 1e-7             # authors' code


@register("pkt", PKTParams)
class PKT(LossDistiller):
    """Probabilistic knowledge transfer. Loss keys: ``ce``, ``pkt``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: PKTParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.tap_pair(params.tap, params.teacher_tap)

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        loss = pkt_loss(embedding(self.s_feats[self.params.tap]), embedding(self.t_feats[self.t_name]),
                        self.params.eps)
        return {"pkt": self.params.weight * loss}
