"""``simkd``: Chen, Mei, Wang, Feng & Chen, "Knowledge Distillation with the Reused Teacher
Classifier", CVPR 2022.

A projector ``P`` maps the student's penultimate map to the teacher's penultimate channels;
``L = weight · mean((P(F_s) − F_t)²) + ce_weight · CE(ŷ, y)`` (eq. 2, the L2 feature loss), where
the student's prediction is the frozen **teacher classifier** on the pooled projection,
``ŷ = W_t · avgpool(P(F_s))`` — used at training and at inference, so :meth:`SimKD.deployable`
returns student + projector + reused classifier (:class:`SimKDStudent`).

Projector (SimKD ``models/util.py``, bottleneck with ``factor``): 1×1 conv (Cs→Ct/f) − BN − ReLU
− 3×3 conv (Ct/f→Ct/f) − BN − ReLU − 1×1 conv (Ct/f→Ct) − BN − ReLU, no conv biases. (The
authors' code ends with a ReLU after the last BN, which we keep; the teacher's penultimate
features are post-ReLU too.) If the maps differ in size the larger is average-pooled to the
smaller (the student map before the projector, or the teacher target).

Defaults: ``factor = 2``, ``weight = 1``, ``ce_weight = 0`` (authors' ``scripts/run_distill.sh``:
``--distill simkd -c 0 -d 0 -b 1``: no CE, no KL, feature loss 1), taps ``penultimate`` for both
(authors: ``feat_s[-2]``, ``feat_t[-2]``), ``teacher_classifier = "auto"`` (the last
``nn.Linear`` of the teacher whose input size is the teacher's penultimate channel count;
or give a module path such as ``fc``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from letkd.methods.base import Context, Distiller, register
from letkd.models.taps import capture, get_module, resolve


def projector(c_s: int, c_t: int, factor: int = 2) -> nn.Sequential:
    """SimKD's bottleneck projector (see module doc)."""
    mid = max(1, c_t // factor)
    return nn.Sequential(
        nn.Conv2d(c_s, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True),
    )


def find_classifier(teacher: nn.Module, in_features: int) -> str:
    """Module path of the last ``nn.Linear`` of ``teacher`` taking ``in_features`` inputs."""
    found = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear) and m.in_features == in_features]
    if not found:
        raise ValueError(f"simkd: no nn.Linear with in_features={in_features} in the teacher; "
                         f"set method.teacher_classifier to the classifier's module path")
    return found[-1]


class SimKDStudent(nn.Module):
    """The deployed SimKD model: student trunk → projector → pooled → reused teacher classifier.

    Features are captured by a hook that exists only during this module's forward, so copies
    (``deepcopy``, export) stay self-contained. The student's own classifier runs but is unused.
    """

    def __init__(self, student: nn.Module, feature_path: str, projector: nn.Module,
                 classifier: nn.Module, pool_to: tuple[int, int] | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.classifier = classifier
        self.feature_path = feature_path
        self.pool_to = pool_to

    def head(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(projected map, logits)`` from the student's penultimate map."""
        if self.pool_to is not None:
            feat = F.adaptive_avg_pool2d(feat, self.pool_to)
        z = self.projector(feat)
        return z, self.classifier(F.adaptive_avg_pool2d(z, 1).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with capture(self.student, {"f": self.feature_path}) as cap:
            self.student(images)
            feat = cap["f"]
        return self.head(feat)[1]


@dataclass
class SimKDParams:
    tap: str = "penultimate"            # authors: feat_s[-2] (last map before pooling)
    teacher_tap: str = ""               # empty: same name as ``tap`` (authors: feat_t[-2])
    teacher_classifier: str = "auto"    # module path of the teacher's classifier, or auto
    factor: int = 2                     # projector bottleneck factor (authors' SimKD(factor=2))
    weight: float = 1.0                 # authors -b 1
    ce_weight: float = 0.0              # authors -c 0 (and -d 0: no KL term)


@register("simkd", SimKDParams)
class SimKD(Distiller):
    """SimKD. Extra module: ``projector`` (trained); the teacher classifier is reused frozen.
    Loss keys: ``ce``, ``feat``. Logits are those of the reused classifier."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: SimKDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        (cs, hs, ws), (ct, ht, wt) = self.tap_pair(params.tap, params.teacher_tap)
        self.projector = projector(cs, ct, params.factor)
        path = params.teacher_classifier
        if path == "auto":
            path = find_classifier(teacher, ct)
        classifier = get_module(teacher, path)
        self.pool_student = (ht, wt) if hs > ht else None
        self.pool_teacher = (hs, ws) if hs < ht else None
        # not registered as a submodule: it shares student / projector / teacher classifier
        object.__setattr__(self, "_deployed", SimKDStudent(
            student, resolve(student, params.tap, ctx.student_arch), self.projector, classifier,
            self.pool_student))

    def deployable(self) -> nn.Module:
        return self._deployed

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      **batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.teacher_forward(images)
        self.student(images)
        z, logits = self._deployed.head(self.s_feats[self.params.tap])
        t = self.t_feats[self.t_name]
        if self.pool_teacher is not None:
            t = F.adaptive_avg_pool2d(t, self.pool_teacher)
        return logits, {"ce": self.params.ce_weight * F.cross_entropy(logits, labels),
                        "feat": self.params.weight * F.mse_loss(z, t)}
