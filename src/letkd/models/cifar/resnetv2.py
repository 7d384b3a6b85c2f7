"""``ResNet50`` for CIFAR (RepDistiller's ``models/resnetv2.py``): ImageNet-style bottleneck
ResNet with a 3x3 stride-1 stem and four stages (strides 1, 2, 2, 2; 4x4 map at 32x32 input).

Module names, shapes and initialisation follow RepDistiller, so its checkpoints load with
``strict=True``; ``forward`` returns logits only and the stem ReLU is a module (a tap point).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNetV2", "BasicBlockV2", "BottleneckV2", "ResNet18", "ResNet34", "ResNet50",
           "ResNet101", "TAPS"]


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential, as in RepDistiller) or 1x1 conv + BN projection."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockV2(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    """Four-stage ResNet (64, 128, 256, 512 x expansion) for small images."""

    def __init__(self, block: type, num_blocks: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def ResNet18(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    return ResNetV2(BasicBlockV2, [2, 2, 2, 2], num_classes, in_channels)


def ResNet34(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    return ResNetV2(BasicBlockV2, [3, 4, 6, 3], num_classes, in_channels)


def ResNet50(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """RepDistiller's ``ResNet50`` (bottleneck, [3, 4, 6, 3]); the CIFAR teacher of MobileNetV2."""
    return ResNetV2(BottleneckV2, [3, 4, 6, 3], num_classes, in_channels)


def ResNet101(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    return ResNetV2(BottleneckV2, [3, 4, 23, 3], num_classes, in_channels)


# METHOD §2: teacher taps at layer4 (4x4 at 32x32 input) and the first block of layer4.
TAPS = {
    "stem": "relu",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
    "penultimate": "layer4",
    "last_stage_first_block": "layer4.0",
}
