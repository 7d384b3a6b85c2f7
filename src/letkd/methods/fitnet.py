"""``fitnet``: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

``L = ce_weight · CE + weight · mean((r(F_s) − F_t)²)`` at one hint layer, where ``r`` is a
convolutional regressor (eq. 3; :func:`letkd.methods.losses.hint_loss`). Trained in one stage
together with CE (as RepDistiller and mdistiller do; the paper's separate hint pre-training
stage is not used by the standard protocol).

Regressor (RepDistiller / mdistiller ``ConvReg``): student H = 2·teacher H → 3×3 conv stride 2;
2·student H = teacher H → 4×4 transposed conv stride 2; student H ≥ teacher H → conv with kernel
``(1+ΔH, 1+ΔW)``; otherwise 3×3 conv and the teacher map average-pooled to the student size;
then BatchNorm + ReLU.

Defaults: hint tap ``stage2`` (the middle stage: RepDistiller ``--hint_layer 2`` = ``feat[2]``,
the output of the second stage; mdistiller FITNET.HINT_LAYER 2), ``weight = 100`` (RepDistiller
README ``-b 100``; mdistiller FITNET.LOSS.FEAT_WEIGHT 100), ``ce_weight = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import hint_loss


class ConvRegressor(nn.Module):
    """Maps a student map ``(Cs, Hs, Ws)`` to the teacher's ``(Ct, Ht, Wt)`` (see module doc)."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
        self.pool_teacher_to: tuple[int, int] | None = None
        if hs == 2 * ht:
            conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif 2 * hs == ht:
            conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht:
            conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            conv = nn.Conv2d(cs, ct, 3, padding=1)
            self.pool_teacher_to = (hs, ws)
        self.conv = conv
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(s)))

    def target(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.pool_teacher_to is None else F.adaptive_avg_pool2d(t, self.pool_teacher_to)


@dataclass
class FitNetParams:
    tap: str = "stage2"        # hint/guided layer (RepDistiller hint_layer=2; mdistiller HINT_LAYER 2)
    teacher_tap: str = ""      # empty: same name as ``tap``
    weight: float = 100.0      # RepDistiller -b 100; mdistiller FITNET.LOSS.FEAT_WEIGHT 100
    ce_weight: float = 1.0     # RepDistiller -r 1; mdistiller FITNET.LOSS.CE_WEIGHT 1


@register("fitnet", FitNetParams)
class FitNet(LossDistiller):
    """FitNet hint loss. Extra module: ``regressor``. Loss keys: ``ce``, ``feat``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: FitNetParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        s_shape, t_shape = self.tap_pair(params.tap, params.teacher_tap)
        for who, name, shape in (("tap", params.tap, s_shape), ("teacher_tap", self.t_name, t_shape)):
            if len(shape) != 3:
                raise ValueError(f"method.{who}={name!r} outputs features of shape {tuple(shape)} per image; FitNet "
                                 f"needs a C×H×W feature map (4-D batch): choose a convolutional stage "
                                 f"(`letkd taps MODEL` lists the named taps)")
        self.regressor = ConvRegressor(s_shape, t_shape)

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        s = self.regressor(self.s_feats[self.params.tap])
        t = self.regressor.target(self.t_feats[self.t_name])
        return {"feat": self.params.weight * hint_loss(s, t)}
