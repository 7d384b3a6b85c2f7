"""``rkd``: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

``L = ce_weight · CE + weight · (distance_weight · L_D + angle_weight · L_A)`` with the
distance-wise (eqs. 5-6) and angle-wise (eqs. 7-8) Huber losses on the pooled embeddings
(:func:`letkd.methods.losses.rkd_distance_loss`, :func:`~letkd.methods.losses.rkd_angle_loss`).

Defaults: ``distance_weight = 25``, ``angle_weight = 50`` (RepDistiller ``RKDLoss(w_d=25,
w_a=50)``; mdistiller RKD.DISTANCE_WEIGHT 25, ANGLE_WEIGHT 50), ``weight = 1`` (RepDistiller
README ``-b 1``; mdistiller RKD.LOSS.FEAT_WEIGHT 1), ``ce_weight = 1``; tap ``penultimate``
global-average-pooled (both use the pooled feature); pdist eps 1e-12, not squared (mdistiller
RKD.PDIST).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import embedding, rkd_angle_loss, rkd_distance_loss


@dataclass
class RKDParams:
    tap: str = "penultimate"
    teacher_tap: str = ""
    distance_weight: float = 25.0   # RepDistiller w_d; mdistiller RKD.DISTANCE_WEIGHT
    angle_weight: float = 50.0      # RepDistiller w_a; mdistiller RKD.ANGLE_WEIGHT
    weight: float = 1.0             # RepDistiller -b 1; mdistiller RKD.LOSS.FEAT_WEIGHT
    ce_weight: float = 1.0


@register("rkd", RKDParams)
class RKD(LossDistiller):
    """Relational KD. Loss keys: ``ce``, ``rkd_distance``, ``rkd_angle``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: RKDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.tap_pair(params.tap, params.teacher_tap)

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        p = self.params
        s = embedding(self.s_feats[p.tap])
        t = embedding(self.t_feats[self.t_name])
        return {"rkd_distance": p.weight * p.distance_weight * rkd_distance_loss(s, t),
                "rkd_angle": p.weight * p.angle_weight * rkd_angle_loss(s, t)}
