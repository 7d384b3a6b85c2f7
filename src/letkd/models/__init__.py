"""The model zoo: ``create(name, num_classes, in_channels)``, ``names()``, ``register`` and ``TAPS``.

Names are RepDistiller's for the CIFAR zoo (``resnet8`` ... ``ShuffleV2``; identical state_dict
keys and shapes, so published checkpoints load unchanged) and torchvision's for ImageNet models
(``resnet18``, ``mobilenet_v2`` ...). ``TAPS[name]`` maps tap names (``penultimate``,
``last_stage_first_block``, ``stem``, ``stage1`` ...) to module paths (METHOD §2).
Users add models with ``register(name, builder, taps={...})``.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Callable

from torch import nn

from letkd.models import catalog as _catalog
from letkd.models import shipped as _shipped
from letkd.models.cifar import ZOO as _CIFAR_ZOO
from letkd.models.imagenet import TAPS as _IMAGENET_TAPS
from letkd.models.weights import fingerprint, load_weights

__all__ = ["create", "names", "register", "TAPS", "REGISTRY", "load_weights", "fingerprint",
           "is_cifar", "UnknownModelError"]

Builder = Callable[..., nn.Module]

#: name -> builder(num_classes=..., in_channels=..., **kw) -> nn.Module
REGISTRY: dict[str, Builder] = {}
#: name -> {tap name: module path}
TAPS: dict[str, dict[str, str]] = {}
_CIFAR_NAMES: set[str] = set()


class UnknownModelError(KeyError, ValueError):
    """A model name that is not registered (the message lists the valid names)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(name: str, fn: Builder, taps: dict[str, str] | None = None, overwrite: bool = False) -> None:
    """Add a model: ``fn(num_classes=..., in_channels=..., **kw)`` must return an ``nn.Module``
    (a builder with an ``image_size`` parameter also gets the input size (H, W) of the run).

    ``taps`` maps tap names (``penultimate``, and ``last_stage_first_block`` for letKD-2) to
    module paths of the built model; names left out are resolved automatically
    (:mod:`letkd.models.autotaps`). From the command line: put the ``register`` calls in a
    module of yours and pass ``--import MODULE`` to ``letkd``.
    """
    if not overwrite and name in REGISTRY:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise TypeError(f"register({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    REGISTRY[name] = fn
    TAPS[name] = dict(taps or {})


def names() -> list[str]:
    """All registered model names (CIFAR zoo first, then ImageNet, then user models)."""
    return list(REGISTRY)


def is_cifar(name: str) -> bool:
    """Whether ``name`` is one of the RepDistiller-compatible CIFAR models."""
    return name in _CIFAR_NAMES


def create(name: str, num_classes: int | None = None, in_channels: int | None = None, pretrained: str | None = None,
           checkpoint: str | Path | None = None, weights: str | None = None,
           image_size: tuple[int, int] | int | None = None, **kw: Any) -> nn.Module:
    """Build model ``name``.

    ``pretrained``: a torchvision weights enum name (ImageNet models only), e.g.
    ``"ResNet34_Weights.IMAGENET1K_V1"``. ``checkpoint``: a weights file loaded with
    :func:`load_weights` (RepDistiller, letkd or plain state_dict), or the name of shipped
    weights. ``weights``: the data set of weights shipped with letkd for this model
    (``create("resnet20", weights="fashion_mnist")``; :mod:`letkd.models.shipped`), which also
    sets the default ``num_classes`` / ``in_channels``. Defaults otherwise: 100 classes, 3
    channels. The model carries its tap table as ``model.letkd_taps`` and its name as
    ``model.letkd_arch``.

    ``torchvision:<name>`` / ``timm:<name>`` build any model of those catalogues
    (:mod:`letkd.models.catalog`; ``pretrained``: ``"default"``, an enum name or a local file);
    ``image_size`` (H, W) reaches the models that depend on it (vision transformers).
    """
    if weights:
        if checkpoint:
            raise ValueError(f"create({name!r}): give weights= (shipped) or checkpoint= (a file), not both")
        entry = _shipped.for_arch(name, weights)
        num_classes = entry.num_classes if num_classes is None else num_classes
        in_channels = entry.in_channels if in_channels is None else in_channels
        checkpoint = entry.name
    num_classes = 100 if num_classes is None else num_classes
    in_channels = 3 if in_channels is None else in_channels
    if _catalog.is_catalogue(name):
        model = _catalog.build(name, num_classes, in_channels, pretrained or None, image_size, **kw)
        if checkpoint:
            load_weights(model, checkpoint, arch=name)
        return _label(model, name, _catalog.taps(name), in_channels, image_size)
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Valid names: {', '.join(REGISTRY)}, or "
                                f"torchvision:<name> / timm:<name> (`letkd models --all`). A model of your own: "
                                f"register it in a module of yours and pass --import MODULE to letkd")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    if pretrained:
        if name not in _IMAGENET_TAPS:
            raise ValueError(f"pretrained={pretrained!r}: torchvision weights exist only for the ImageNet "
                             f"models ({', '.join(_IMAGENET_TAPS)}); for {name!r} give a checkpoint file")
        kw["pretrained"] = pretrained
    if image_size is not None and "image_size" in inspect.signature(REGISTRY[name]).parameters:
        kw["image_size"] = image_size
    model = REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kw)
    if checkpoint:
        load_weights(model, checkpoint, arch=name)
    return _label(model, name, TAPS.get(name, {}), in_channels, image_size)


def _label(model: nn.Module, name: str, taps: dict[str, str], in_channels: int,
           image_size: tuple[int, int] | int | None) -> nn.Module:
    """Attach the name, the tap table and (when known) the input shape used to resolve taps."""
    model.letkd_taps = dict(taps)
    model.letkd_arch = name
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        model.letkd_input_shape = (in_channels, *hw)
    return model


def _register_builtin() -> None:
    from letkd.models import imagenet

    for n, (fn, taps) in _CIFAR_ZOO.items():
        register(n, fn, taps)
        _CIFAR_NAMES.add(n)
    for n, taps in _IMAGENET_TAPS.items():
        def build(num_classes: int = 1000, in_channels: int = 3, _n: str = n, **kw: Any) -> nn.Module:
            return imagenet.build(_n, num_classes=num_classes, in_channels=in_channels, **kw)

        register(n, build, taps)


_register_builtin()
