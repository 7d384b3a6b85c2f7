"""``reviewkd``: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021.

Student features of several levels (shallow → deep, the deepest being the globally pooled
penultimate map) are fused from deep to shallow by attention-based fusion (ABF) modules: each
ABF maps its level with a 1×1 conv+BN to ``mid`` channels, fuses it with the (nearest-upsampled)
fused map of the deeper level through a 2-channel sigmoid attention, resizes to the teacher's
spatial size and maps to the teacher's channels with a 3×3 conv+BN. The outputs are compared
with the teacher features of the same levels by the hierarchical context loss (HCL, pyramid
levels 4, 2, 1; :func:`letkd.methods.losses.hcl_loss`):
``L = ce_weight · CE + weight · min(epoch / warmup, 1) · HCL``.

Defaults: taps ``stage1, stage2, stage3`` + the pooled ``penultimate`` level (mdistiller
ReviewKD: ``feats[1:]`` + ``pooled_feat``), ``mid = min(512, C_student_last)`` (mdistiller
MAX_MID_CHANNEL 512), ``warmup = 20`` epochs (authors' ``--kd-warm-up 20``; mdistiller
WARMUP_EPOCHS 20), ``ce_weight = 1``, ``weight = 5.0`` (mdistiller ``configs/cifar100/
reviewkd.yaml`` REVIEWKD_WEIGHT 5.0 and the authors' ``script/reviewKD.sh`` for most pairs; the
authors' per-pair values are in :data:`REVIEWKD_WEIGHT_PER_PAIR`). Conv init kaiming-uniform with
``a = 1`` (authors' / mdistiller ABF).

Deviations from the original: (1) the teacher features are the tap outputs — for CIFAR ResNets
the post-ReLU block outputs — whereas the authors use pre-ReLU teacher features
(``preact=True``); point ``teacher_taps`` at pre-activation modules where a model has them.
(2) The warm-up uses the 1-based epoch (mdistiller), the authors' script a 0-based one (its
first epoch has weight 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import hcl_loss, warmup_factor

#: (teacher, student) -> loss weight, from the authors' CIFAR-100/script/reviewKD.sh
#: (dvlab-research/ReviewKD); mdistiller uses 5.0 for resnet32x4 -> resnet8x4.
REVIEWKD_WEIGHT_PER_PAIR: dict[tuple[str, str], float] = {
    ("wrn_40_2", "wrn_16_2"): 5.0,
    ("wrn_40_2", "wrn_40_1"): 5.0,
    ("wrn_40_2", "ShuffleV1"): 5.0,
    ("resnet32x4", "resnet8x4"): 5.0,
    ("resnet32x4", "ShuffleV1"): 5.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
}


def reviewkd_weight(teacher: str, student: str, default: float = 5.0) -> float:
    """The authors' ReviewKD loss weight for a CIFAR-100 pair (``default`` otherwise)."""
    return REVIEWKD_WEIGHT_PER_PAIR.get((teacher, student), default)


class ABF(nn.Module):
    """Attention-based fusion of one level with the fused map of the deeper level."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.out = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output in teacher shape, fused map passed to the next shallower level)``."""
        x = self.reduce(x)
        if self.att is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            a = self.att(torch.cat([x, deeper], 1))
            x = x * a[:, :1] + deeper * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.out(x), x


@dataclass
class ReviewKDParams:
    taps: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage3"])  # shallow -> deep
    teacher_taps: list[str] = field(default_factory=list)   # empty: same names as ``taps``
    pooled_tap: str = "penultimate"   # deepest level, globally pooled to 1x1 ("" to omit)
    teacher_pooled_tap: str = ""      # empty: same as ``pooled_tap``
    max_mid_channels: int = 512       # mdistiller REVIEWKD.MAX_MID_CHANNEL
    weight: float = 5.0               # mdistiller cifar100/reviewkd.yaml; authors' script (see dict)
    warmup: float = 20.0              # authors --kd-warm-up 20; mdistiller WARMUP_EPOCHS 20 (may be fractional)
    ce_weight: float = 1.0            # authors --ce-loss-weight 1; mdistiller CE_WEIGHT 1
    pyramid: list[int] = field(default_factory=lambda: [4, 2, 1])   # HCL levels (authors' hcl)


@register("reviewkd", ReviewKDParams)
class ReviewKD(LossDistiller):
    """Knowledge review. Extra modules: ``abfs`` (deep → shallow). Loss keys: ``ce``, ``reviewkd``.
    Needs ``batch['epoch']`` when ``warmup > 0``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: ReviewKDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        t_taps = list(params.teacher_taps or params.taps)
        if len(t_taps) != len(params.taps):
            raise ValueError(f"reviewkd: {len(params.taps)} student taps but {len(t_taps)} teacher taps")
        self.s_names = list(params.taps)
        self.t_names = t_taps
        s_shapes = dict(self.tap(self.s_names))
        t_shapes = dict(self.teacher_tap(self.t_names))
        self.pooled = bool(params.pooled_tap)
        if self.pooled:
            tp = params.teacher_pooled_tap or params.pooled_tap
            self.s_pool_name, self.t_pool_name = params.pooled_tap, tp
            sc = self.tap([params.pooled_tap])[params.pooled_tap][0]
            tc = self.teacher_tap([tp])[tp][0]
            s_list = [s_shapes[n] for n in self.s_names] + [(sc, 1, 1)]
            t_list = [t_shapes[n] for n in self.t_names] + [(tc, 1, 1)]
        else:
            s_list = [s_shapes[n] for n in self.s_names]
            t_list = [t_shapes[n] for n in self.t_names]
        mid = min(params.max_mid_channels, s_list[-1][0])
        # one ABF per level, stored deep -> shallow; the deepest does not fuse
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i > 0)
            for i, (s, t) in enumerate(zip(reversed(s_list), reversed(t_list))))
        self.t_sizes = [tuple(t[1:]) for t in t_list]

    def _levels(self, feats: dict[str, torch.Tensor], names: list[str], pool_name: str | None) -> list[torch.Tensor]:
        out = [feats[n] for n in names]
        if pool_name:
            out.append(F.adaptive_avg_pool2d(feats[pool_name], 1))
        return out

    def review(self) -> list[torch.Tensor]:
        """Fused student features (shallow → deep), each in its teacher level's shape."""
        xs = self._levels(self.s_feats, self.s_names, self.s_pool_name if self.pooled else None)
        outs: list[torch.Tensor] = []
        deeper = None
        for abf, x, size in zip(self.abfs, reversed(xs), reversed(self.t_sizes)):
            y, deeper = abf(x, deeper, size)
            outs.insert(0, y)
        return outs

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        p = self.params
        w = p.weight * warmup_factor(batch.get("epoch"), p.warmup, "reviewkd")
        t_levels = self._levels(self.t_feats, self.t_names, self.t_pool_name if self.pooled else None)
        loss = hcl_loss(self.review(), t_levels, tuple(p.pyramid))
        return {"reviewkd": w * loss}
