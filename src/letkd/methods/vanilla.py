"""``vanilla``: the student trained alone with cross-entropy (the "S" column of every table)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from letkd.methods.base import Distiller, register


@dataclass
class VanillaParams:
    label_smoothing: float = 0.0


@register("vanilla", VanillaParams)
class Vanilla(Distiller):
    """Plain supervised training: ``L = CE(student(x), y)``. Needs no teacher."""

    def __init__(self, student, teacher, ctx, params: VanillaParams) -> None:
        super().__init__(student, None, ctx)  # a vanilla run never needs the teacher
        self.params = params

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels, label_smoothing=self.params.label_smoothing)}
