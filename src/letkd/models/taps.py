"""Named feature points ("taps") captured by forward hooks on module paths.

Features never come from forward-signature flags (RepDistiller's ``is_feat``): a tap is a
module path such as ``"layer3"`` or ``"layer3.0"``; its feature is that module's output.
That is why unmodified torchvision or user models work with every method.

* :func:`capture` records the outputs of named module paths during a forward pass.
* :func:`insert_after` makes a module's output pass through another module (used to attach
  KD layers, METHOD §2); the inserted module is registered on the model so ``state_dict``,
  ``eval`` and export see it, and the model's own forward runs it.
* :func:`resolve` turns a tap name (``penultimate``, ``last_stage_first_block``,
  ``stage1`` ...) or a raw module path into a module path for a given architecture.

The per-architecture tables live in :mod:`letkd.models` (``TAPS``) next to the zoo; models
without one get ``penultimate`` / ``last_stage_first_block`` from :mod:`letkd.models.autotaps`.
Vision transformers' token outputs (B×N×C) are seen as B×C×h×w maps of their patch tokens by
:func:`capture` and :func:`insert_after` (:mod:`letkd.models.tokens`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from letkd.models.tokens import as_map, layout_of, map_apply

__all__ = [
    "get_module",
    "resolve",
    "capture",
    "Capture",
    "insert_after",
    "feature_shapes",
]


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at a dotted ``path`` ("" is the model itself); clear error if absent."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        top = sorted({n.split(".")[0] for n in names})
        raise KeyError(
            f"module path {path!r} does not exist in {type(model).__name__}; "
            f"top-level modules are {top}. Use `letkd taps MODEL` (or "
            f"[n for n, _ in model.named_modules()]) to list every valid path."
        ) from None


def resolve(model: nn.Module, tap: str, arch: str | None = None,
            input_shape: tuple[int, ...] | None = None) -> str:
    """Map a tap name to a module path.

    ``tap`` is either a named tap of the architecture ``arch`` (see ``letkd.models.TAPS``),
    or a module path of ``model``. A model may also carry its own table in the attribute
    ``letkd_taps`` (a ``dict`` name -> path), which takes precedence. ``penultimate`` and
    ``last_stage_first_block`` missing from the table are resolved automatically with a dry
    forward at ``input_shape`` (C, H, W; default ``model.letkd_input_shape``) and remembered in
    ``model.letkd_taps`` (:func:`letkd.models.autotaps.auto_taps`).
    """
    table = dict(getattr(model, "letkd_taps", {}) or {})
    if not table and arch is not None:
        from letkd.models import TAPS  # local import: models imports this module

        table = dict(TAPS.get(arch, {}))
    if tap in table:
        return table[tap]
    from letkd.models.autotaps import AUTO_TAPS, resolve_auto

    if tap in AUTO_TAPS and not _is_path(model, tap):
        shape = input_shape or getattr(model, "letkd_input_shape", None)
        if shape is None:
            raise ValueError(f"tap {tap!r} of {arch or type(model).__name__}: no tap table, and no input shape to "
                             f"resolve it with; pass input_shape=(C, H, W) or name a module path")
        found, errors = resolve_auto(model, tuple(shape), arch)
        if tap in errors:
            raise errors[tap]
        model.letkd_taps = {**found, **table}
        return found[tap]
    get_module(model, tap)  # raises a clear KeyError naming the valid paths
    return tap


def _is_path(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


class Capture:
    """Holds the features captured during the last forward pass, keyed by the caller's names."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.features:
            raise KeyError(f"tap {key!r} was not reached by the forward pass; captured: {list(self.features)}")
        return self.features[key]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_capture(model: nn.Module, paths: dict[str, str]) -> Capture:
    """Register persistent forward hooks storing ``{name: output of module at path}``.

    The hooks stay until ``Capture.remove()``. Outputs are stored as-is (with autograd history),
    so losses on student features back-propagate; token sequences of a vision transformer are
    stored as the B×C×h×w map of their patch tokens (a view, :mod:`letkd.models.tokens`).
    """
    cap = Capture()
    layout = layout_of(model)
    for name, path in paths.items():
        module = get_module(model, path)

        def hook(_m: nn.Module, _inp, out, _name: str = name) -> None:
            cap.features[_name] = as_map(out, layout)

        cap._handles.append(module.register_forward_hook(hook))
    return cap


@contextmanager
def capture(model: nn.Module, paths: dict[str, str]) -> Iterator[Capture]:
    """Context manager form of :func:`attach_capture`: hooks removed on exit."""
    cap = attach_capture(model, paths)
    try:
        yield cap
    finally:
        cap.remove()


def insert_after(model: nn.Module, path: str, module: nn.Module, name: str,
                 container: str = "kd_layers",
                 apply: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Make the output of ``model.<path>`` pass through ``module`` inside ``model``'s forward.

    ``module`` is registered as ``model.<container>.<name>`` (an ``nn.ModuleDict``), so it is
    part of ``state_dict`` / ``parameters`` / ``eval()`` / ONNX export of ``model`` alone.
    ``apply(module, output)`` returns the replacement output (default: ``module(output)``; a
    tuple result's first element is used). Several modules inserted after the same path run
    in insertion order. A token sequence of a vision transformer passes as the B×C×h×w map of
    its patch tokens and the result is written back into the sequence, prefix (class, register,
    distillation) tokens unchanged (:mod:`letkd.models.tokens`). Returns ``model``.
    """
    target = get_module(model, path)
    if not hasattr(model, container):
        model.add_module(container, nn.ModuleDict())
    holder = getattr(model, container)
    if not isinstance(holder, nn.ModuleDict):
        raise TypeError(f"model.{container} exists and is not an nn.ModuleDict")
    if name in holder:
        raise ValueError(f"a module named {name!r} is already inserted in model.{container}")
    holder[name] = module

    def plain(mod: nn.Module, out):
        res = mod(out)
        return res[0] if isinstance(res, tuple) else res

    run = map_apply(layout_of(model), apply or plain)

    def hook(_m: nn.Module, _inp, out):
        return run(module, out)

    target.register_forward_hook(hook)
    return model


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: dict[str, str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes (without batch) of the tapped features for an input of ``input_shape`` (C, H, W).

    Runs one forward of a batch of 2 zeros in eval mode (training mode is restored after).
    """
    was_training = model.training
    model.eval()
    try:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        with capture(model, paths) as cap:
            model(torch.zeros(2, *input_shape, device=device))
            shapes = {k: tuple(v.shape[1:]) for k, v in cap.features.items()}
    finally:
        model.train(was_training)
    missing = set(paths) - set(shapes)
    if missing:
        raise RuntimeError(f"taps {sorted(missing)} were never reached by the forward pass")
    return shapes
