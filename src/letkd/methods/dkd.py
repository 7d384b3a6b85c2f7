"""``dkd``: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022.

``L = ce_weight · CE + weight · min(epoch / warmup, 1) · (α · TCKD + β · NCKD)`` (eq. 7;
:func:`letkd.methods.losses.dkd_loss`; TCKD / NCKD both with T² scaling, batch mean).

Defaults: ``α = 1``, ``β = 8``, ``T = 4``, ``warmup = 20`` epochs, ``ce_weight = 1`` — mdistiller
``CFG.DKD`` (ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20, CE_WEIGHT 1.0). ``weight`` (1.0) is an extra
overall multiplier (no counterpart in mdistiller; used by ``combo``).

β per CIFAR-100 pair, from mdistiller ``configs/cifar100/dkd/*.yaml`` (pairs without a ``BETA``
entry use the default 8.0): see :data:`DKD_BETA_PER_PAIR` and :func:`dkd_beta`. Configs for a
pair should set ``method.beta`` to that value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import dkd_loss, warmup_factor

#: (teacher, student) -> β, from mdistiller configs/cifar100/dkd/<pair>.yaml (commit e8c5bb3).
DKD_BETA_PER_PAIR: dict[tuple[str, str], float] = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("vgg13", "vgg8"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
}


def dkd_beta(teacher: str, student: str, default: float = 8.0) -> float:
    """β that mdistiller uses for a CIFAR-100 (teacher, student) pair (``default`` otherwise)."""
    return DKD_BETA_PER_PAIR.get((teacher, student), default)


@dataclass
class DKDParams:
    alpha: float = 1.0        # TCKD weight (mdistiller DKD.ALPHA)
    beta: float = 8.0         # NCKD weight (mdistiller DKD.BETA; per pair: DKD_BETA_PER_PAIR)
    T: float = 4.0            # temperature (mdistiller DKD.T)
    warmup: float = 20.0      # epochs of linear warm-up min(epoch/warmup, 1) (mdistiller DKD.WARMUP); may be fractional
    ce_weight: float = 1.0    # mdistiller DKD.CE_WEIGHT
    weight: float = 1.0       # overall multiplier of α·TCKD + β·NCKD (ours; 1 = mdistiller)


@register("dkd", DKDParams)
class DKD(LossDistiller):
    """Decoupled KD on logits. Loss keys: ``ce``, ``tckd``, ``nckd`` (weighted, warmed-up).
    Needs ``batch['epoch']`` (1-based) when ``warmup > 0``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: DKDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        p = self.params
        w = p.weight * warmup_factor(batch.get("epoch"), p.warmup, "dkd")
        tckd, nckd = dkd_loss(s_logits, t_logits, labels, p.T)
        return {"tckd": w * p.alpha * tckd, "nckd": w * p.beta * nckd}
