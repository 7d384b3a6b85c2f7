"""``sp``: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

``L = ce_weight · CE + weight · ‖norm(G_t) − norm(G_s)‖_F² / b²`` with ``G = F Fᵀ`` over the
flattened feature maps of the batch and row-wise L2 normalisation (eq. 4;
:func:`letkd.methods.losses.sp_loss`).

Defaults: tap ``penultimate`` (the last feature map before pooling: RepDistiller uses
``feat[-2]``), ``weight = 3000`` (RepDistiller README ``-b 3000``; mdistiller
SP.LOSS.FEAT_WEIGHT 3000), ``ce_weight = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import sp_loss


@dataclass
class SPParams:
    tap: str = "penultimate"      # student feature (RepDistiller feat[-2])
    teacher_tap: str = ""         # empty: same name as ``tap``
    weight: float = 3000.0        # RepDistiller -b 3000; mdistiller SP FEAT_WEIGHT 3000
    ce_weight: float = 1.0


@register("sp", SPParams)
class SP(LossDistiller):
    """Similarity-preserving KD. Loss keys: ``ce``, ``sp``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: SPParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.tap_pair(params.tap, params.teacher_tap)

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        loss = sp_loss(self.s_feats[self.params.tap], self.t_feats[self.t_name])
        return {"sp": self.params.weight * loss}
