"""``vid``: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for
Knowledge Transfer", CVPR 2019.

``L = ce_weight · CE + weight · Σ_layers mean(½ (log σ_c² + (t − μ(s))² / σ_c²))``: the negative
log-likelihood of the teacher map under a Gaussian whose mean ``μ`` is a regressor of the
student map and whose variance is per channel, ``σ_c² = softplus(α_c) + ε`` (eq. 5 with the
"heteroscedastic over channels" parameterisation; :func:`letkd.methods.losses.vid_nll`).

Regressor per layer: 1×1 conv (Cs→Ct) − ReLU − 1×1 conv (Ct→Ct) − ReLU − 1×1 conv (Ct→Ct), no
bias (RepDistiller ``VIDLoss(s, t, t)``: mid channels = teacher channels). ``α_c`` initialised so
that ``σ_c² = init_pred_var`` (softplus⁻¹(5 − ε)). Larger map pooled to the smaller.

Defaults: taps ``stage1, stage2, stage3`` (RepDistiller ``feat[1:-1]``), ``weight = 1``
(RepDistiller README ``-b 1``; mdistiller VID FEAT_WEIGHT 1), ``init_pred_var = 5.0``,
``eps = 1e-5`` (RepDistiller VIDLoss defaults; mdistiller VID.INIT_PRED_VAR, VID.EPS),
``ce_weight = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import match_spatial, vid_nll


class VIDRegressor(nn.Module):
    """Mean regressor + per-channel variance parameter for one layer."""

    def __init__(self, c_s: int, c_t: int, init_pred_var: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
        )
        inv_softplus = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((c_t,), inv_softplus))
        self.eps = eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(s, t)
        return vid_nll(self.mean(s), t, self.log_scale, self.eps)


@dataclass
class VIDParams:
    taps: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage3"])
    teacher_taps: list[str] = field(default_factory=list)   # empty: same names as ``taps``
    weight: float = 1.0            # RepDistiller -b 1; mdistiller VID.LOSS.FEAT_WEIGHT 1
    init_pred_var: float = 5.0     # RepDistiller VIDLoss init_pred_var; mdistiller VID.INIT_PRED_VAR
    eps: float = 1e-5              # RepDistiller VIDLoss eps; mdistiller VID.EPS
    ce_weight: float = 1.0


@register("vid", VIDParams)
class VID(LossDistiller):
    """Variational information distillation. Extra modules: ``regressors``. Loss keys: ``ce``, ``vid``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: VIDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.t_names = list(params.teacher_taps or params.taps)
        if len(self.t_names) != len(params.taps):
            raise ValueError(f"vid: {len(params.taps)} student taps but {len(self.t_names)} teacher taps")
        s_shapes = self.tap(list(params.taps))
        t_shapes = self.teacher_tap(self.t_names)
        self.regressors = nn.ModuleList(
            VIDRegressor(s_shapes[s][0], t_shapes[t][0], params.init_pred_var, params.eps)
            for s, t in zip(params.taps, self.t_names))

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        loss = sum(reg(self.s_feats[s], self.t_feats[t])
                   for reg, s, t in zip(self.regressors, self.params.taps, self.t_names))
        return {"vid": self.params.weight * loss}
