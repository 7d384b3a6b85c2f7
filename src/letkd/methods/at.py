"""``at``: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

``L = ce_weight · CE + weight · Σ_layers mean((Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²)`` with spatial attention
``Q = mean_c f_c^p`` (eq. 2, β/2 folded into ``weight``; :func:`letkd.methods.losses.at_loss`).
If a student and teacher map differ in size the larger is average-pooled to the smaller.

Defaults: ``p = 2``, ``weight = 1000``, ``ce_weight = 1``, taps ``stage1, stage2, stage3`` —
RepDistiller (``Attention(p=2)`` on ``feat[1:-1]``, i.e. every stage output; README ``-b 1000``)
and mdistiller ``CFG.AT`` (P 2, FEAT_WEIGHT 1000, CE_WEIGHT 1). For 4-stage networks add
``stage4`` (teacher and student need the same number of taps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import at_loss


@dataclass
class ATParams:
    taps: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage3"])  # student
    teacher_taps: list[str] = field(default_factory=list)  # empty: same names as ``taps``
    p: float = 2.0            # RepDistiller Attention(p=2); mdistiller AT.P 2
    weight: float = 1000.0    # RepDistiller -b 1000; mdistiller AT.LOSS.FEAT_WEIGHT 1000
    ce_weight: float = 1.0    # RepDistiller -r 1; mdistiller AT.LOSS.CE_WEIGHT 1


@register("at", ATParams)
class AT(LossDistiller):
    """Attention transfer. Loss keys: ``ce``, ``at``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: ATParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.t_names = list(params.teacher_taps or params.taps)
        if len(self.t_names) != len(params.taps):
            raise ValueError(f"at: {len(params.taps)} student taps but {len(self.t_names)} teacher taps")
        self.tap(list(params.taps))
        self.teacher_tap(self.t_names)

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        loss = sum(at_loss(self.s_feats[s], self.t_feats[t], self.params.p)
                   for s, t in zip(self.params.taps, self.t_names))
        return {"at": self.params.weight * loss}
