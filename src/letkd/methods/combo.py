"""``combo``: a weighted sum of several methods' losses on ONE student and ONE teacher forward.

Example (CRD+KD of the CRD paper, Tian et al. ICLR 2020, Table 1 "CRD+KD"; RepDistiller README:
``--distill crd -r 1 -a 1 -b 0.8``)::

    method:
      name: combo
      ce_weight: 1.0
      parts:
        - {name: crd, weight: 0.8}
        - {name: kd, weight: 1.0}

Semantics:

* Each entry of ``parts`` is the ``method:`` section of that method (``name`` + any of its own
  parameters, validated like a standalone method; unspecified ones take its defaults). Its
  ``weight`` is therefore the method's own term weight (e.g. KD's KL weight, CRD's β).
* Cross-entropy is counted **once**: ``ce_weight · CE(student(x), y)`` with combo's own
  ``ce_weight`` (default 1.0, the CRD+KD setting). The parts' ``ce`` terms are never computed;
  setting ``ce_weight`` inside a part is an error.
* The loss dict holds ``ce`` and every part's terms under their usual names (``crd``, ``kd``...);
  a name used by two parts is prefixed by ``<part name><position>_``.
* Parts must be methods built on the CE + terms skeleton (every baseline except ``simkd``,
  which replaces the student's logits, and ``combo`` itself).

The parts' extra modules live in ``parts.<i>``; each part's hooks capture its own taps during the
shared forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from letkd.config import ConfigError
from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, Distiller, create, make_params, register

_NOT_COMBINABLE = ("combo", "simkd", "vanilla")


def _resolve_part(i: int, part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        part = {"name": part}
    if not isinstance(part, dict) or "name" not in part:
        raise ConfigError(f"method.parts[{i}] must be a mapping with a 'name', got {part!r}")
    name = part["name"]
    if name in _NOT_COMBINABLE:
        raise ConfigError(f"method.parts[{i}]: {name!r} cannot be a combo part")
    if "ce_weight" in part:
        raise ConfigError(f"method.parts[{i}] ({name}): set ce_weight on combo itself; "
                          f"combo counts cross-entropy once")
    values = {k: v for k, v in part.items() if k != "name"}
    try:
        params = make_params(name, values)
    except KeyError as e:
        raise ConfigError(f"method.parts[{i}]: {e.args[0]}") from None
    out = {"name": name, **dataclasses.asdict(params)}
    out.pop("ce_weight", None)
    return out


@dataclass
class ComboParams:
    parts: list[dict] = field(default_factory=lambda: [{"name": "crd", "weight": 0.8},
                                                       {"name": "kd", "weight": 1.0}])
    ce_weight: float = 1.0     # CRD+KD: RepDistiller -r 1

    def __post_init__(self) -> None:
        if not self.parts:
            raise ConfigError("method.parts is empty: list at least one method, e.g. [{name: kd}]")
        # validate every part now and store its fully-resolved parameters (for config.yaml)
        self.parts = [_resolve_part(i, p) for i, p in enumerate(self.parts)]


@register("combo", ComboParams)
class Combo(Distiller):
    """Weighted sum of several methods' loss terms on a shared forward (see module doc)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: ComboParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        self.parts = nn.ModuleList()
        self.part_names: list[str] = []
        for spec in params.parts:
            spec = dict(spec)
            name = spec.pop("name")
            part = create(name, student, teacher, ctx, spec)
            if not isinstance(part, LossDistiller):
                raise ConfigError(f"combo: method {name!r} does not expose its loss terms "
                                  f"(it is not a LossDistiller) and cannot be combined")
            # the student and teacher are owned by combo: keep them as plain attributes of the
            # part so they appear once in state_dict / parameters()
            for shared in ("student", "teacher"):
                module = part._modules.pop(shared)
                object.__setattr__(part, shared, module)
            self.parts.append(part)
            self.part_names.append(name)

    def prepare(self, train_data: Any, run_dir: Any = None) -> None:
        for part in self.parts:
            part.prepare(train_data, run_dir)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      **batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t_logits = self.teacher_forward(images)   # one teacher forward fills every part's taps
        s_logits = self.student(images)
        losses = {"ce": self.params.ce_weight * F.cross_entropy(s_logits, labels)}
        for i, (name, part) in enumerate(zip(self.part_names, self.parts)):
            for key, value in part.distill_losses(s_logits, t_logits, labels, **batch).items():
                losses[key if key not in losses else f"{name}{i}_{key}"] = value
        return s_logits, losses

