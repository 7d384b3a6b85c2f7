"""MobileNetV2 for CIFAR as in RepDistiller's ``mobile_half`` (expansion 6, width 0.5).

Stem ``conv1`` (3x3, stride 2), seven stages ``blocks.0..6`` of inverted residuals, 1x1 head
``conv2`` to 1280 channels (2x2 at 32x32 input), pooling and ``classifier.0``. Names, shapes
and initialisation follow RepDistiller's ``models/mobilenetv2.py``; ``forward`` returns logits.
"""
from __future__ import annotations

import torch
from torch import nn

from letkd.models.cifar._init import fan_out_init

__all__ = ["MobileNetV2", "InvertedResidual", "mobile_half", "TAPS"]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection (``conv.0..7``), residual if shapes agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with expansion ``T`` and width multiplier ``width_mult``."""

    def __init__(self, T: int, num_classes: int = 100, width_mult: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        setting = [  # expansion, channels, repeats, stride
            [1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2],
            [T, 96, 3, 1], [T, 160, 3, 2], [T, 320, 1, 1],
        ]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width_mult)
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
            self.blocks.append(nn.Sequential(*stage))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        fan_out_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.conv2(out)
        return self.classifier(torch.flatten(self.avgpool(out), 1))


def mobile_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's ``mobile_half`` (registered in letkd as ``MobileNetV2``)."""
    return MobileNetV2(6, num_classes, 0.5, in_channels)


# METHOD §2: penultimate after the last 1x1 conv (conv2, 1280x2x2); intermediate after
# blocks[5][0], the first block of the 160-channel (x0.5 = 80) stage. Stages as RepDistiller's
# feature list: blocks 1, 2, 4, 6.
TAPS = {
    "stem": "conv1",
    "stage1": "blocks.1",
    "stage2": "blocks.2",
    "stage3": "blocks.4",
    "stage4": "blocks.6",
    "penultimate": "conv2",
    "last_stage_first_block": "blocks.5.0",
}
