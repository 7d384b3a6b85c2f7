"""Shared skeleton of the baseline methods (not a method itself; not auto-registered).

Most baselines have the objective ``ce_weight · CE(student(x), y) + Σ method terms``, where the
terms come from the logits and tapped features of ONE student and ONE teacher forward. They
subclass :class:`LossDistiller` and implement only :meth:`LossDistiller.distill_losses`; this
split is what lets ``combo`` add several methods' terms on one shared forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from letkd.methods.base import Distiller

__all__ = ["LossDistiller"]


class LossDistiller(Distiller):
    """A Distiller whose loss is CE + terms of (student logits, teacher logits, tapped features).

    Subclasses set ``self.params`` (a dataclass with at least ``ce_weight``) and implement
    :meth:`distill_losses`, which reads ``self.s_feats`` / ``self.t_feats`` filled by the
    forwards of :meth:`forward_train` and returns ``{name: weighted loss}``.
    """

    params: Any

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      **batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t_logits = self.teacher_forward(images)  # once per batch; features -> self.t_feats
        s_logits = self.student(images)          # features -> self.s_feats
        losses = {"ce": self.params.ce_weight * F.cross_entropy(s_logits, labels)}
        losses.update(self.distill_losses(s_logits, t_logits, labels, **batch))
        return s_logits, losses
