"""Attaching KD layers to a student through its taps (METHOD §2).

:class:`letkd.layers.KDLayer` knows only its mathematics; this module places layers in a
model: each layer is registered as ``student.kd_layers.<name>`` and runs inside the student's
own forward through a forward hook on the tapped module (:func:`letkd.models.taps.insert_after`),
so the student alone has it in ``state_dict``, ``eval()`` and ONNX export, and needs no teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from letkd.layers import KDLayer
from letkd.models.taps import feature_shapes, insert_after, resolve

__all__ = ["KDLayerSpec", "attach_kd_layers"]


@dataclass
class KDLayerSpec:
    """Where and how to attach one KD layer: a tap name or module path of the student,
    the number of templates K, the residual weight α, and (optionally) the channel count C
    (found by a dry forward pass when None)."""

    tap: str
    num_templates: int
    alpha: float = 1.0
    channels: int | None = None


def attach_kd_layers(student: nn.Module, arch: str | None, specs: Mapping[str, KDLayerSpec],
                     input_shape: tuple[int, int, int] | None = None) -> dict[str, KDLayer]:
    """Attach KD layers to ``student`` (METHOD §2); return ``{name: KDLayer}``.

    Each layer is registered as ``student.kd_layers.<name>`` and a forward hook on the tapped
    module replaces its output by the layer's ``x_hat`` (scores kept in ``layer.last_scores``).
    Layers whose taps resolve to the same module path run in the order of ``specs``: pass the
    intermediate layer before the penultimate one (METHOD §2, resnet8x4). ``arch`` selects the
    tap table of ``letkd.models.TAPS`` (None: ``specs`` give module paths). ``input_shape``
    (C, H, W) is needed only when a spec has ``channels=None``.
    Layers with ``alpha == 0`` get ``bn`` and ``values`` frozen (``requires_grad=False``):
    they are not used in the forward.
    """
    paths = {name: resolve(student, spec.tap, arch) for name, spec in specs.items()}
    need = {n: p for n, p in paths.items() if specs[n].channels is None}
    shapes: dict[str, tuple[int, ...]] = {}
    if need:
        if input_shape is None:
            raise ValueError(f"attach_kd_layers: channels unknown for {sorted(need)}; pass input_shape=(C, H, W) "
                             "or give KDLayerSpec.channels")
        shapes = feature_shapes(student, need, input_shape)
    p = next(iter(student.parameters()), None)
    layers: dict[str, KDLayer] = {}
    for name, spec in specs.items():
        c = spec.channels if spec.channels is not None else int(shapes[name][0])
        layer = KDLayer(c, spec.num_templates, spec.alpha)
        if p is not None:
            layer = layer.to(device=p.device)
        if spec.alpha == 0.0:
            for q in [*layer.bn.parameters(), *layer.values.parameters()]:
                q.requires_grad_(False)
        insert_after(student, paths[name], layer, name)
        layers[name] = layer
    return layers
