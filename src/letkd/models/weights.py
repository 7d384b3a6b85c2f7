"""Loading model weights safely, and fingerprinting them.

:func:`load_weights` accepts a RepDistiller file (``{'model': state_dict, 'epoch': ..., ...}``),
a letkd checkpoint (``{'model': state_dict, 'config': ..., ...}``), or a plain state_dict,
strips DDP's ``module.`` (and ``torch.compile``'s ``_orig_mod.``) prefixes, and loads with
``strict=True`` after a check whose error names what differs. Files are read with
``torch.load(weights_only=True)`` only: a file holding pickled objects is refused, and a file torch
cannot read is diagnosed from its bytes (not torch / damaged / would run code, :mod:`letkd.engine.torchfile`).

:func:`fingerprint` is a stable hash of a state_dict, tying cached teacher targets to the
exact teacher weights they were computed from.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_weights", "read_state_dict", "extract_state_dict", "fingerprint"]

_PREFIXES = ("module.", "_orig_mod.")
_MAX_LIST = 10


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely and return the model's state_dict in it (prefixes stripped).
    ``source`` may also name shipped weights (``fashion_mnist/resnet20``, :mod:`letkd.models.shipped`)."""
    from letkd.models.shipped import resolve_weights_source

    path = resolve_weights_source(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - told apart from the bytes (never unpickled): not torch / damaged / code
        from letkd.engine.checkpoint import unreadable_message
        from letkd.engine.torchfile import diagnose

        raise ValueError(unreadable_message(path, "weights", *diagnose(path, e))) from None
    return extract_state_dict(obj, where=str(path))


def extract_state_dict(obj: Any, where: str = "object") -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint-like object (``'model'``/``'state_dict'`` key or plain)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, expected a dict (a state_dict or "
                         f"{{'model': state_dict, ...}})")
    sd: Any = obj
    for key in ("model", "state_dict", "model_state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(sd):
        raise ValueError(
            f"{where} is neither a state_dict nor a checkpoint with a 'model' state_dict; "
            f"top-level keys: {list(obj)[:_MAX_LIST]}"
        )
    return _strip_prefixes(dict(tensors))


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LIST} more" if len(items) > _MAX_LIST else ""
    return ", ".join(items[:_MAX_LIST]) + more


def _mismatch_message(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: str | None, where: str) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(own[k].shape), tuple(sd[k].shape)) for k in own if k in sd and own[k].shape != sd[k].shape]
    if not (missing or unexpected or shapes):
        return None
    name = arch or type(model).__name__
    lines = [f"weights from {where} do not fit {name}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): " + _listing(
            [f"{k} expected {e} found {f}" for k, e, f in shapes]))
    # the likely cause
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = {f"{last_linear[-1]}.weight", f"{last_linear[-1]}.bias"} if last_linear else set()
    if not missing and not unexpected and shapes and {k for k, _, _ in shapes} <= head:
        found = sd[f"{last_linear[-1]}.weight"].shape[0]
        lines.append(f"  likely cause: the checkpoint has {found} classes; create the model with "
                     f"num_classes={found}.")
    elif missing or unexpected:
        lines.append("  likely cause: the checkpoint is of another architecture (or depth/width); "
                     "check the model name that goes with this file.")
    else:
        lines.append("  likely cause: another width, number of classes or input channels.")
    return "\n".join(lines)


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], arch: str | None = None) -> None:
    """Load weights into ``model`` strictly (in place).

    ``source``: path of a RepDistiller / letkd checkpoint or a plain state_dict file, or such a
    dict already in memory. ``arch`` only improves error messages. Raises ValueError naming
    missing keys, unexpected keys and shape mismatches (at most 10 of each) and the likely
    cause; the model is left untouched in that case.
    """
    if isinstance(source, Mapping):
        where, sd = "the given dict", extract_state_dict(source, where="the given dict")
    else:
        where, sd = str(source), read_state_dict(source)
    msg = _mismatch_message(model, sd, arch, where)
    if msg:
        raise ValueError(msg)
    model.load_state_dict(sd, strict=True)


def fingerprint(state_dict: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """sha256 (first 16 hex chars) over sorted key names, shapes, dtypes and tensor bytes."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
