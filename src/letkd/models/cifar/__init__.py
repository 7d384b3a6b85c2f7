"""RepDistiller-compatible CIFAR model zoo: builders and tap tables, by RepDistiller's names.

``ZOO[name] = (builder, taps)``; ``builder(num_classes=100, in_channels=3) -> nn.Module``.
Every model has RepDistiller's exact state_dict keys and shapes (for ``in_channels=3``), so its
published ``{'model': state_dict}`` checkpoints load with ``strict=True``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from letkd.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["ZOO"]

ZOO: dict[str, tuple[Callable[..., nn.Module], dict[str, str]]] = {
    **{name: (getattr(resnet, name), resnet.TAPS) for name in (
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4")},
    "ResNet50": (resnetv2.ResNet50, resnetv2.TAPS),
    **{name: (getattr(wrn, name), wrn.TAPS) for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "vgg8": (vgg.vgg8, vgg.taps_for("S")),
    "vgg11": (vgg.vgg11, vgg.taps_for("A")),
    "vgg13": (vgg.vgg13, vgg.taps_for("B")),
    "vgg16": (vgg.vgg16, vgg.taps_for("D")),
    "vgg19": (vgg.vgg19, vgg.taps_for("E")),
    "MobileNetV2": (mobilenetv2.mobile_half, mobilenetv2.TAPS),
    "ShuffleV1": (shufflenetv1.ShuffleV1, shufflenetv1.TAPS),
    "ShuffleV2": (shufflenetv2.ShuffleV2, shufflenetv2.TAPS),
}
