"""Taps without a table: ``penultimate`` and ``last_stage_first_block`` found from the module
tree and one dry forward, for models that have no hand-written table (``timm:`` / most
``torchvision:`` names, registered models without ``taps``). ``letkd taps MODEL`` prints them;
a config overrides either with a module path.

* **penultimate** — the last spatial feature map before global pooling (METHOD §2): the input
  of the last global pooling module (``AdaptiveAvgPool2d``, timm's ``SelectAdaptivePool2d``
  ...), or, when the model pools functionally, the last map any module outputs. A map is a
  B×C×H×W tensor or a transformer's token sequence (:mod:`letkd.models.tokens`). Token maps
  must reach the logits: when the head reads only the class token, the patch tokens of the last
  block and of the final norm do not, so the previous block is taken (``blocks.10`` of a
  12-block ViT). Its path is the outermost module producing that tensor whose input is already
  at the final resolution (``layer4.2``, ``bn2``, ``features.12``).
* **last_stage_first_block** — the first block (in call order) whose output has the final
  resolution: the block that starts the last stage (ResNet ``layer4.0``, MobileNetV2
  ``features.14``, ConvNeXt ``stages.3.blocks.0``). A *block* is a module with at least two
  weight layers (convolutions, linear maps) that is neither a container (``Sequential``,
  ``ModuleList``, ``ModuleDict``) nor a stage (a module holding two blocks of one class).
  Vision transformers keep one resolution throughout: one stage, so this is their first block
  (``blocks.0``); a later block is usually the better choice and is named with a module path.

The dry forward runs at the model's input shape (eval mode, no gradients); at tiny inputs where
two stages end at the same resolution the earlier stage's first block would be found, so
resolve at the training resolution (``letkd taps MODEL --size N``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from letkd.models.tokens import TokenLayout, layout_of

__all__ = ["AUTO_TAPS", "auto_taps", "resolve_auto", "TapResolutionError"]

AUTO_TAPS = ("penultimate", "last_stage_first_block")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SKIP = ("kd_layers",)  # modules letkd inserted: not part of the architecture


class TapResolutionError(ValueError):
    """A tap that cannot be resolved automatically (the message lists candidate module paths)."""


@dataclass
class _Call:
    path: str
    start: int
    end: int = -1
    inp: Any = None
    out: Any = None


def _grid(x: Any, layout: TokenLayout | None) -> tuple[int, int] | None:
    """Spatial size of a map output (B×C×H×W, or tokens of ``layout``), else None."""
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() == 4:
        return (int(x.shape[-2]), int(x.shape[-1]))
    if layout is not None and layout.is_tokens(x):
        return layout.grid_for(x.shape[1])
    return None


def _first_tensor(args: tuple, kwargs: dict) -> Any:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], Any]:
    """Every module call of one forward of ``x``: start/end order, first input tensor, output."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    clock = [0]
    handles = []
    for path, m in model.named_modules():
        if not path or path.split(".")[0] in _SKIP:
            continue

        def pre(mod: nn.Module, args: tuple, kwargs: dict, _p: str = path) -> None:
            c = _Call(_p, clock[0], inp=_first_tensor(args, kwargs))
            clock[0] += 1
            calls.append(c)
            open_calls.setdefault(id(mod), []).append(c)

        def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            c = open_calls[id(mod)].pop()
            c.end, c.out = clock[0], out
            clock[0] += 1

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return [c for c in calls if c.end >= 0], logits


def _blocks(model: nn.Module) -> set[str]:
    """Paths of the blocks of ``model`` (see the module doc)."""
    mods = {p: m for p, m in model.named_modules() if p and p.split(".")[0] not in _SKIP}
    weights = dict.fromkeys(mods, 0)
    for p, m in mods.items():
        if any(q.dim() >= 2 for q in m.parameters(recurse=False)):
            parts = p.split(".")
            for i in range(1, len(parts) + 1):
                anc = ".".join(parts[:i])
                if anc in weights:
                    weights[anc] += 1
    units = [p for p, m in mods.items() if weights[p] >= 2 and not isinstance(m, _CONTAINERS)]
    blocks = set()
    for u in units:
        counts: dict[type, int] = {}
        for v in units:
            if v.startswith(u + "."):
                counts[type(mods[v])] = counts.get(type(mods[v]), 0) + 1
        if max(counts.values(), default=0) < 2:
            blocks.add(u)
    return blocks


def _inside(path: str, paths: set[str]) -> bool:
    """Whether ``path`` lies strictly inside one of ``paths``."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _is_global_pool(mod: nn.Module, out: Any) -> bool:
    name = type(mod).__name__.lower()
    if "pool" not in name or not ("adaptive" in name or "global" in name):
        return False
    return isinstance(out, torch.Tensor) and (out.dim() == 2 or (out.dim() == 4 and tuple(out.shape[-2:]) == (1, 1)))


def _first(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _probe(model: nn.Module, calls: list[_Call], logits: Any) -> tuple[str | None, torch.Tensor]:
    """Where to observe what reaches the output: the input of the classifier (the last module
    call with a weight matrix; a zero-initialised head would hide everything in the logits),
    else the logits. Returns (module path or None for the logits, the reference value)."""
    mods = dict(model.named_modules())
    for c in sorted(calls, key=lambda c: -c.start):
        if isinstance(c.inp, torch.Tensor) and any(q.dim() >= 2 for q in mods[c.path].parameters(recurse=False)):
            return c.path, c.inp.clone()
    return None, _first(logits)


@torch.no_grad()
def _patches_matter(model: nn.Module, path: str, x: torch.Tensor, probe: tuple[str | None, torch.Tensor],
                    layout: TokenLayout) -> bool:
    """Whether perturbing the patch tokens output by ``path`` changes what reaches the classifier."""
    seen: list[torch.Tensor] = []
    def perturb(_m: nn.Module, _i: Any, out: Any) -> Any:
        if not layout.is_tokens(out):
            return out
        noisy = out.clone()
        noisy[:, layout.prefix:] += torch.randn(noisy[:, layout.prefix:].shape,
                                                generator=torch.Generator().manual_seed(1)).to(out)
        return noisy

    where, ref = probe
    handles = [model.get_submodule(path).register_forward_hook(perturb)]
    if where is not None:
        handles.append(model.get_submodule(where).register_forward_pre_hook(lambda _m, a: seen.append(a[0])))
    try:
        out = _first(model(x))
    finally:
        for h in handles:
            h.remove()
    got = seen[-1] if seen else out
    return bool((got - ref).abs().max() > 1e-6 * (1.0 + float(ref.abs().max())))


def _listing(calls: list[_Call], layout: TokenLayout | None, limit: int = 12) -> str:
    seen, rows = set(), []
    for c in reversed(calls):
        g = _grid(c.out, layout)
        if g is not None and c.path not in seen:
            seen.add(c.path)
            rows.append(f"{c.path} {tuple(_first(c.out).shape[1:])}")
    return ", ".join(rows[:limit]) + (" ..." if len(rows) > limit else "")


def auto_taps(model: nn.Module, input_shape: tuple[int, ...], name: str | None = None) -> dict[str, str]:
    """Resolve ``penultimate`` and ``last_stage_first_block`` of ``model`` for inputs of
    ``input_shape`` (C, H, W) with one dry forward; raise :class:`TapResolutionError` (listing
    candidate module paths) when the model does not fit the rules of the module doc."""
    found, errors = resolve_auto(model, input_shape, name)
    if errors:
        raise next(iter(errors.values()))
    return found


@torch.no_grad()
def resolve_auto(model: nn.Module, input_shape: tuple[int, ...],
                 name: str | None = None) -> tuple[dict[str, str], dict[str, TapResolutionError]]:
    """Like :func:`auto_taps`, but returns ``(resolved taps, {tap: error})``: a model whose
    penultimate map is found but no block is still usable by letKD-1."""
    name = name or getattr(model, "letkd_arch", None) or type(model).__name__
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        raise TapResolutionError(f"{name} computes channels-last (NHWC) feature maps; letkd's taps and KD layers "
                                 f"need B×C×H×W maps or token sequences, so this model is not supported")
    layout = layout_of(model)
    was_training = model.training
    model.eval()
    try:
        p = next(iter(model.parameters()), None)
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        x = x.to(p.device if p is not None else "cpu")
        calls, logits = _trace(model, x)
        probe = _probe(model, calls, logits)
        blocks = _blocks(model)
        mods = dict(model.named_modules())
        override = " Name the taps with module paths instead (e.g. method.student_penult_tap=<path>)."

        pools = [c for c in calls if _is_global_pool(mods[c.path], c.out) and _grid(c.inp, layout) is not None]
        if pools:
            last_pool = pools[-1]
            target, before = last_pool.inp, last_pool.start
        else:
            maps = [c for c in calls if _grid(c.out, layout) is not None]
            if not maps:
                raise TapResolutionError(f"cannot resolve 'penultimate' of {name}: no module outputs a B×C×H×W map "
                                         f"or a token sequence for input {tuple(input_shape)}.{override}")
            last = max(maps, key=lambda c: c.end)
            target, before = last.out, last.end + 1
        if layout is not None and layout.is_tokens(target):
            trunk = [c for c in calls if c.end < before and layout.is_tokens(c.out) and not _inside(c.path, blocks)]
            target, tried = None, set()
            for c in sorted(trunk, key=lambda c: -c.end):
                if id(c.out) in tried:  # the same tensor as a module already tried (a container's output)
                    continue
                tried.add(id(c.out))
                if _patches_matter(model, c.path, x, probe, layout):
                    target = c.out
                    break
            if target is None:
                raise TapResolutionError(f"cannot resolve 'penultimate' of {name}: no token sequence whose patch "
                                         f"tokens reach the logits; token outputs: {_listing(trunk, layout)}.{override}")
        res = _grid(target, layout)
        producers = [c for c in calls if c.out is target and c.inp is not target]
        if res is None or not producers:
            raise TapResolutionError(f"cannot resolve 'penultimate' of {name}: the map entering global pooling "
                                     f"is not the output of a module; module outputs that are maps: "
                                     f"{_listing(calls, layout)}.{override}")
        # the outermost producer that spans no resolution change; the last block rather than a
        # container of blocks (``blocks.2``, not ``blocks``)
        at_res = [c for c in producers if _grid(c.inp, layout) == res] or producers
        at_res = [c for c in at_res if not (isinstance(mods[c.path], _CONTAINERS) and
                                            any(b.startswith(c.path + ".") for b in blocks))] or at_res
        penult = max(at_res, key=lambda c: c.end)
        found = {"penultimate": penult.path}
        first = [c for c in calls if c.path in blocks and c.start < penult.end and _grid(c.out, layout) == res]
        if first:
            return {**found, "last_stage_first_block": min(first, key=lambda c: c.start).path}, {}
        cands = [c for c in calls if c.start < penult.end]
        return found, {"last_stage_first_block": TapResolutionError(
            f"cannot resolve 'last_stage_first_block' of {name}: no block (a module with >= 2 conv/linear "
            f"layers) outputs the final {res[0]}×{res[1]} resolution before {penult.path!r}; candidate module "
            f"paths: {_listing(cands, layout)}. Name it with a module path (e.g. method.student_inter_tap=<path>)")}
    finally:
        model.train(was_training)
