"""The weight initialisation RepDistiller's VGG and MobileNetV2 share (kept identical so a model
built here starts from the same distribution as theirs)."""
from __future__ import annotations

import math

from torch import nn


def fan_out_init(model: nn.Module) -> None:
    """Conv: normal(0, sqrt(2 / fan_out)), zero bias; BN: weight 1, bias 0; Linear: normal(0, 0.01), zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
