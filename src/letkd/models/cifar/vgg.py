"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19 = RepDistiller's ``*_bn``).

Five conv blocks ``block0..4`` (each ends with BN; the ReLU after it is applied by the network),
max-pools ``pool0..3``, adaptive average pool ``pool4``, and one linear ``classifier``. As in
RepDistiller, ``pool3`` is used only for 64x64 inputs. The ReLU after each block is the module
``relu0..relu4`` here (parameter-less, so the state_dict is RepDistiller's) so that every block
output is a tap point.
"""
from __future__ import annotations

import torch
from torch import nn

from letkd.models.cifar._init import fan_out_init

__all__ = ["VGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "taps_for"]

CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    """conv3x3-BN-ReLU repeated, without the final ReLU (RepDistiller's ``_make_layers``)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for small images; ``forward`` returns logits."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.block0 = _block(cfg[0], in_channels)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.block4 = _block(cfg[4], cfg[3][-1])
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        fan_out_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:  # RepDistiller's rule: the fourth pool only for 64x64 inputs
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(CFG["S"], num_classes, in_channels)


def vgg11(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(CFG["A"], num_classes, in_channels)


def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(CFG["B"], num_classes, in_channels)


def vgg16(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(CFG["D"], num_classes, in_channels)


def vgg19(num_classes: int = 100, in_channels: int = 3) -> VGG:
    return VGG(CFG["E"], num_classes, in_channels)


def taps_for(cfg_name: str) -> dict[str, str]:
    """Tap table of a VGG configuration.

    ``penultimate`` is block4's output after its ReLU (before pooling). The last stage is
    block4; its "first block" is its first conv-BN-ReLU (``block4.2``). vgg8's block4 has a
    single conv, so there both taps coincide at ``relu4`` (like resnet8x4's one-block stage).
    """
    first = "relu4" if len(CFG[cfg_name][4]) == 1 else "block4.2"
    return {"stem": "relu0", "stage1": "relu1", "stage2": "relu2", "stage3": "relu3", "stage4": "relu4",
            "penultimate": "relu4", "last_stage_first_block": first}
