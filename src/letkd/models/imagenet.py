"""torchvision ImageNet models by their torchvision names, with tap tables.

Models are built with ``weights=None`` and the requested ``num_classes``; ``in_channels != 3``
replaces the first convolution by one with the same settings and the new input width.
``pretrained="ResNet34_Weights.IMAGENET1K_V1"`` (any torchvision weights enum name of that
architecture) loads torchvision's weights, e.g. for an ImageNet teacher (METHOD §4).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["TAPS", "build", "resolve_weights", "replace_first_conv"]

_RESNET = {"stem": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer4",
           "penultimate": "layer4", "last_stage_first_block": "layer4.0"}

TAPS: dict[str, dict[str, str]] = {
    **{n: dict(_RESNET) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                   "wide_resnet50_2", "resnext50_32x4d")},
    # features.14 starts the 160-channel stride-32 stage; features.18 is the 1x1 conv to 1280.
    "mobilenet_v2": {"stem": "features.0", "stage1": "features.3", "stage2": "features.6",
                     "stage3": "features.13", "stage4": "features.17",
                     "penultimate": "features.18", "last_stage_first_block": "features.14"},
    # features.6 is the first stride-32 stage (192 ch); features.8 the 1x1 head conv to 1280.
    "efficientnet_b0": {"stem": "features.0", "stage1": "features.2", "stage2": "features.3",
                        "stage3": "features.5", "stage4": "features.7",
                        "penultimate": "features.8", "last_stage_first_block": "features.6.0"},
    # stages are features.1/3/5/7 (downsampling layers in between); LayerNorm follows the pool.
    "convnext_tiny": {"stem": "features.0", "stage1": "features.1", "stage2": "features.3",
                      "stage3": "features.5", "stage4": "features.7",
                      "penultimate": "features.7", "last_stage_first_block": "features.7.0"},
}


def resolve_weights(name: str, weights: str) -> Any:
    """Turn a torchvision weights enum name (``"ResNet34_Weights.IMAGENET1K_V1"``) into the enum.

    Checks that the enum belongs to the architecture ``name``; raises ValueError otherwise.
    """
    from torchvision import models as tvm

    valid_cls = tvm.get_model_weights(name)
    valid = [f"{valid_cls.__name__}.{w.name}" for w in valid_cls]
    try:
        w = tvm.get_weight(weights)
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"unknown torchvision weights {weights!r} for {name!r}; "
                         f"valid names: {', '.join(valid)}") from None
    if not isinstance(w, valid_cls):
        raise ValueError(f"weights {weights!r} are not for architecture {name!r}; valid names: {', '.join(valid)}")
    return w


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first ``nn.Conv2d`` of ``model`` by one reading ``in_channels`` channels."""
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return
            if m.groups != 1:
                raise ValueError(f"cannot change the input channels of grouped conv {path!r}")
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, 1, m.bias is not None, m.padding_mode)
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, new)
            return
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be changed")


def build(name: str, num_classes: int = 1000, in_channels: int = 3, pretrained: str | None = None,
          **kw: Any) -> nn.Module:
    """Build torchvision model ``name``; ``pretrained`` is a weights enum name (needs the file
    in the torch hub cache or internet access)."""
    from torchvision import models as tvm

    model = tvm.get_model(name, weights=None, num_classes=num_classes, **kw)
    if pretrained:
        w = resolve_weights(name, pretrained)
        n_cls = len(w.meta.get("categories") or [])
        if n_cls and n_cls != num_classes:
            raise ValueError(f"{pretrained} has {n_cls} classes; create the model with num_classes={n_cls}")
        if in_channels != 3:
            raise ValueError(f"{pretrained} expects 3 input channels; in_channels={in_channels} is not supported "
                             f"with pretrained weights")
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # no internet / no cached file
            raise RuntimeError(
                f"could not get {pretrained} ({w.url}): {e}. Without internet, put the file "
                f"in the torch hub cache (torch.hub.get_dir()/checkpoints/) or give a checkpoint path."
            ) from e
        model.load_state_dict(state, strict=True)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model
