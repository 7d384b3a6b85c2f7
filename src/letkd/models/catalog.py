"""The torchvision and timm catalogues by name: ``torchvision:<name>`` and ``timm:<name>``.

``torchvision:<name>`` is any classification model ``torchvision.models.list_models`` lists;
``timm:<name>`` any model ``timm.list_models()`` lists (a pretrained tag may follow the name:
``timm:resnet50.a1_in1k``). timm is an optional extra: ``pip install letkd[timm]``.

Models are built with random weights, ``num_classes`` outputs and ``in_channels`` inputs, as for
the zoo. ``pretrained`` loads the weights the library publishes, through the library's own
mechanism:

* ``"default"`` — the library's default weights for the name (torchvision: the ``DEFAULT``
  enum, downloaded to the torch hub cache; timm: the name's pretrained tag, from the Hugging
  Face hub or its URL, to timm's cache). Needs internet, or the file already in that cache.
* a torchvision weights enum name (``"ResNet50_Weights.IMAGENET1K_V2"`` or ``"IMAGENET1K_V2"``).
* a local file (a path: contains ``/`` or ends in ``.pt``/``.pth``/``.bin``/``.safetensors``) —
  the same published file, copied to a machine without internet. timm reads it with its own
  loader (``pretrained_cfg_overlay=dict(file=...)``: ``weights_only`` torch files or
  safetensors), which adapts the classifier to ``num_classes`` and the first convolution to
  ``in_channels``; torchvision files are plain state_dicts, read with
  ``torch.load(weights_only=True)`` and loaded strictly.

timm's loader re-initialises the classifier when ``num_classes`` differs from the weights'
(a warning says so): right for a student or a teacher about to be fine-tuned
(``letkd train-teacher``), not for a teacher used as is.
"""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["PREFIXES", "is_catalogue", "split", "require_timm", "list_names", "build", "taps",
           "MissingExtraError"]

PREFIXES = ("torchvision:", "timm:")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (the message names the pip command)."""


def is_catalogue(name: str) -> bool:
    """Whether ``name`` is a ``torchvision:<name>`` or ``timm:<name>`` model name."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def split(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``."""
    source, _, inner = name.partition(":")
    if not inner:
        raise ValueError(f"model name {name!r} has no model after {source + ':'!r}; e.g. {source}:resnet50")
    return source, inner


def require_timm() -> Any:
    """Import timm, or fail with the command that installs it."""
    try:
        import timm
    except ImportError:
        raise MissingExtraError("timm:<name> models need the timm package, which is not installed: "
                                "pip install letkd[timm]  (or: pip install timm)") from None
    return timm


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_names(pattern: str | None = None, registry: list[str] | None = None) -> list[str]:
    """Model names matching the shell-style ``pattern`` (all when None): ``registry`` names,
    ``torchvision:*`` and, when timm is installed, ``timm:*`` (a pattern with a ``.`` after the
    timm name, e.g. ``timm:convnext_atto.*``, lists pretrained tags)."""
    names = list(registry or []) + [f"torchvision:{n}" for n in _torchvision_names()]
    want_timm = pattern is None or fnmatch.fnmatchcase("timm:", pattern.split(":")[0] + ":")
    if want_timm:
        try:
            timm = require_timm()
        except MissingExtraError:
            if pattern is not None and pattern.startswith("timm:"):
                raise
            timm = None
        if timm is not None:
            tagged = pattern is not None and "." in pattern.partition(":")[2]
            names += [f"timm:{n}" for n in timm.list_models(pretrained=tagged)]
    return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def _unknown(name: str, valid: list[str]) -> Exception:
    from letkd.models import UnknownModelError

    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    source = name.split(":")[0]
    return UnknownModelError(f"unknown model {name!r}.{hint} `letkd models '{source}:*'` lists the {source} models.")


def _is_file(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.lower().endswith(_FILE_SUFFIXES) or Path(pretrained).is_file()


def _size(image_size: tuple[int, int] | int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def build(name: str, num_classes: int, in_channels: int, pretrained: str | None = None,
          image_size: tuple[int, int] | int | None = None, **kw: Any) -> nn.Module:
    """Build catalogue model ``name`` (``torchvision:...`` / ``timm:...``); see the module doc.

    ``image_size`` (H, W) is passed to models whose layers depend on it (vision transformers'
    position embeddings); other models ignore it. ``kw`` go to the library's constructor."""
    source, inner = split(name)
    size = _size(image_size)
    if source == "timm":
        return _build_timm(name, inner, num_classes, in_channels, pretrained, size, **kw)
    return _build_torchvision(name, inner, num_classes, in_channels, pretrained, size, **kw)


def _build_torchvision(name: str, inner: str, num_classes: int, in_channels: int, pretrained: str | None,
                       size: tuple[int, int] | None, **kw: Any) -> nn.Module:
    from letkd.models import imagenet

    valid = _torchvision_names()
    if inner not in valid:
        raise _unknown(name, [f"torchvision:{n}" for n in valid])
    if size is not None and inner.startswith("vit_") and "image_size" not in kw:
        if size[0] != size[1]:
            raise ValueError(f"{name} needs square images; got {size[0]}×{size[1]}")
        kw["image_size"] = size[0]
    if pretrained and _is_file(pretrained):
        from letkd.models.weights import load_weights

        model = imagenet.build(inner, num_classes=num_classes, in_channels=in_channels, **kw)
        load_weights(model, _read_file(pretrained), arch=name)
        return model
    if pretrained:
        pretrained = _torchvision_weights_name(inner, pretrained)
    return imagenet.build(inner, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, **kw)


def _torchvision_weights_name(inner: str, pretrained: str) -> str:
    """``default`` / ``IMAGENET1K_V2`` / ``ResNet50_Weights.IMAGENET1K_V2`` -> the full enum name."""
    from torchvision import models as tvm

    try:
        cls = tvm.get_model_weights(inner)
    except (KeyError, ValueError):
        raise ValueError(f"torchvision publishes no weights for {inner!r}; give a local weights file") from None
    tag = "DEFAULT" if pretrained.lower() in ("default", "true") else pretrained
    return tag if "." in tag else f"{cls.__name__}.{tag}"


def _read_file(path: str) -> dict[str, Any]:
    """A published weights file: safetensors, or a torch file read with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    from letkd.models.weights import read_state_dict

    return read_state_dict(p)


def _build_timm(name: str, inner: str, num_classes: int, in_channels: int, pretrained: str | None,
                size: tuple[int, int] | None, **kw: Any) -> nn.Module:
    timm = require_timm()
    from timm.models import get_pretrained_cfg

    arch = inner.split(".")[0]
    if not timm.is_model(arch):
        raise _unknown(name, [f"timm:{n}" for n in timm.list_models()])
    try:
        cfg = get_pretrained_cfg(inner)
    except RuntimeError:  # an unknown tag
        tags = timm.list_models(arch, pretrained=True)
        raise ValueError(f"timm has no pretrained tag {inner!r}; tags for {arch}: {', '.join(tags) or 'none'}") from None
    if size is not None and cfg is not None and cfg.fixed_input_size and "img_size" not in kw:
        kw["img_size"] = size  # the input size fixes e.g. a ViT's position embeddings
    load: dict[str, Any] = {}
    if pretrained:
        load["pretrained"] = True
        if _is_file(pretrained):
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"pretrained weights file {pretrained!r} does not exist")
            load["pretrained_cfg_overlay"] = {"file": str(pretrained)}
        elif pretrained.lower() not in ("default", "true"):
            raise ValueError(f"pretrained={pretrained!r} for {name}: use 'default' (the weights timm publishes for "
                             f"this name; pick a tag with timm:{arch}.<tag>, see `letkd models 'timm:{arch}.*'`) "
                             f"or the path of a local weights file")
    try:
        model = timm.create_model(inner, num_classes=num_classes, in_chans=in_channels, **load, **kw)
    except (OSError, RuntimeError) as e:  # no internet / not in the cache / a bad file
        if not pretrained:
            raise
        where = f"the file {pretrained}" if "pretrained_cfg_overlay" in load else \
            f"{(cfg.hf_hub_id or cfg.url) if cfg else inner} (Hugging Face hub / URL)"
        raise RuntimeError(f"could not load the timm weights of {name} from {where}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}. Without internet, copy the published file "
                           f"to this machine and set pretrained to its path.") from e
    if pretrained and cfg is not None and cfg.num_classes and cfg.num_classes != num_classes:
        model.letkd_new_head = True  # a teacher cannot be used as is (letkd.engine.trainer refuses it)
        warnings.warn(f"{name}: the published weights have {cfg.num_classes} classes; the classifier is newly "
                      f"initialised for num_classes={num_classes} (fine-tune it before using the model as a teacher)",
                      stacklevel=3)
    return model


def taps(name: str) -> dict[str, str]:
    """The hand-written tap table of a catalogue model, if it has one (``torchvision:resnet18``
    uses the zoo's); others resolve ``penultimate`` / ``last_stage_first_block`` automatically
    (:mod:`letkd.models.autotaps`)."""
    from letkd.models.imagenet import TAPS

    source, inner = split(name)
    return dict(TAPS.get(inner, {})) if source == "torchvision" else {}
