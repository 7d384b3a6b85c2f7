"""``kd``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

``L = ce_weight · CE(s, y) + weight · T² · KL(softmax(t/T) ‖ softmax(s/T))`` (eq. 2 of the paper;
:func:`letkd.methods.losses.kd_loss`).

Defaults (standard CIFAR-100 protocol): ``T = 4``, ``ce_weight = 0.1``, ``weight = 0.9`` —
RepDistiller ``train_student.py`` (``--kd_T 4``, README ``-r 0.1 -a 0.9``) and mdistiller
``CFG.KD`` (TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import kd_loss


@dataclass
class KDParams:
    T: float = 4.0             # temperature (RepDistiller --kd_T 4; mdistiller KD.TEMPERATURE 4)
    ce_weight: float = 0.1     # RepDistiller -r 0.1; mdistiller KD.LOSS.CE_WEIGHT 0.1
    weight: float = 0.9        # weight of the KL term: RepDistiller -a 0.9; mdistiller KD_WEIGHT 0.9


@register("kd", KDParams)
class KD(LossDistiller):
    """Hinton KD on logits. Loss keys: ``ce``, ``kd``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: KDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        return {"kd": self.params.weight * kd_loss(s_logits, t_logits, self.params.T)}
