"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4), RepDistiller-compatible.

Same module names, parameter shapes and initialisation as RepDistiller's ``models/resnet.py``
so its ``{'model': state_dict}`` checkpoints load with ``strict=True``. Differences: ``forward``
returns logits only (features come from hooks, see :mod:`letkd.models.taps`), pooling is
adaptive (identical at 32x32, also works for other input sizes), and no op modifies a block's
output in place, so a hook that captures or replaces it is safe.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet8", "resnet14", "resnet20", "resnet32",
           "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "TAPS"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; the block output is post-ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) bottleneck with a residual connection; output post-ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages (strides 1, 2, 2), global pooling, linear."""

    def __init__(self, depth: int, num_filters: list[int], block_name: str = "basicblock",
                 num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6:
                raise ValueError(f"BasicBlock ResNet depth must be 6n+2 (20, 32, 44, ...), got {depth}")
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"Bottleneck ResNet depth must be 9n+2, got {depth}")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make(depth: int, filters: list[int]):
    def build(num_classes: int = 100, in_channels: int = 3) -> ResNet:
        return ResNet(depth, filters, "basicblock", num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"CIFAR ResNet of depth {depth}, stage widths {filters}."
    return build


_THIN, _WIDE = [16, 16, 32, 64], [32, 64, 128, 256]
resnet8 = _make(8, _THIN)
resnet14 = _make(14, _THIN)
resnet20 = _make(20, _THIN)
resnet32 = _make(32, _THIN)
resnet44 = _make(44, _THIN)
resnet56 = _make(56, _THIN)
resnet110 = _make(110, _THIN)
resnet8x4 = _make(8, _WIDE)
resnet32x4 = _make(32, _WIDE)

# Every CIFAR ResNet has the same tap table (METHOD §2): the penultimate map is layer3's
# post-ReLU output (8x8 at 32x32 input); the first block of the last stage is layer3.0.
TAPS = {
    "stem": "relu",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "penultimate": "layer3",
    "last_stage_first_block": "layer3.0",
}
