"""ShuffleNetV1 for CIFAR (RepDistiller's ``ShuffleV1``: groups 3, widths 240/480/960).

1x1 stem (stride 1), three stages ``layer1..3`` whose first block halves the resolution
(4x4 at 32x32 input) and concatenates an average-pooled shortcut. Names and shapes follow
RepDistiller's ``models/ShuffleNetv1.py`` (PyTorch default initialisation, as there);
``forward`` returns logits; the stem ReLU is the module ``relu``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShuffleNetV1", "ShuffleV1", "channel_shuffle", "TAPS"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (N, g*c, H, W) -> channel order c-major."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Channel shuffle as a (parameter-less) module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; add (stride 1) or concat (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the first unit after the 24-channel stem is not grouped
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int,
                 num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, n: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(n):
            # the strided first unit concatenates its input, so its branch makes out - in channels
            branch = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(ShuffleUnit(self.in_planes, branch, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def ShuffleV1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, in_channels)


# METHOD §2: penultimate = layer3 output (960x4x4), intermediate = layer3[0].
TAPS = {
    "stem": "relu",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "penultimate": "layer3",
    "last_stage_first_block": "layer3.0",
}
