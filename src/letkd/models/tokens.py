"""Vision-transformer token sequences seen as feature maps (an extension of METHOD §2).

A tap on a transformer block yields tokens ``B×N×C``: ``p`` prefix tokens (class, register,
distillation tokens) followed by ``h·w`` patch tokens in row-major order. Each patch token is a
location, so the patch tokens *are* a ``B×C×h×w`` map: :func:`to_map` drops the prefix tokens
and reshapes, :func:`to_tokens` writes a map back into the sequence (prefix tokens unchanged).
The taps code applies this to every token output of a model that has a :class:`TokenLayout`,
so the KD layer, the codebook and the LDA decisions see ordinary maps.

The layout comes from the model: ``model.letkd_token_prefix`` if set, else timm's
``num_prefix_tokens``, else 1 for torchvision's ``VisionTransformer``. The grid ``h×w`` is
``model.patch_embed.grid_size`` (timm) when it fits the token count, else the square root.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["TokenLayout", "layout_of", "to_map", "to_tokens", "as_map", "map_apply"]


@dataclass(frozen=True)
class TokenLayout:
    """How a model lays out its token sequences: ``prefix`` leading non-patch tokens and,
    when known, the patch grid ``(h, w)``."""

    prefix: int
    grid: tuple[int, int] | None = None

    def grid_for(self, n_tokens: int) -> tuple[int, int] | None:
        """The patch grid of a sequence of ``n_tokens`` tokens, or None if it is not one."""
        n = n_tokens - self.prefix
        if n < 1:
            return None
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        s = math.isqrt(n)
        return (s, s) if s * s == n else None

    def is_tokens(self, x: Any) -> bool:
        """Whether ``x`` is a B×N×C token sequence of this layout."""
        return isinstance(x, torch.Tensor) and x.dim() == 3 and self.grid_for(x.shape[1]) is not None


def layout_of(model: nn.Module) -> TokenLayout | None:
    """The token layout of ``model``, or None for a model without token sequences (CNNs)."""
    prefix = getattr(model, "letkd_token_prefix", None)
    if prefix is None:
        prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None and type(model).__name__ == "VisionTransformer" and hasattr(model, "class_token"):
        prefix = 1  # torchvision: one class token
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        return None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    grid = tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) and len(grid) == 2 else None
    return TokenLayout(prefix, grid)


def to_map(x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens B×N×C -> (patch tokens as a B×C×h×w map, prefix tokens B×p×C)."""
    grid = layout.grid_for(x.shape[1])
    if x.dim() != 3 or grid is None:
        raise ValueError(f"expected B×N×C tokens with {layout.prefix} prefix tokens and a patch grid, "
                         f"got shape {tuple(x.shape)}")
    p = layout.prefix
    # a view: the map's channels are the tokens' last (contiguous) dimension, as channels_last.
    # reshape with x.shape[0] (not unflatten) keeps the batch dynamic in an ONNX trace.
    return x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid), x[:, :p]


def to_tokens(fmap: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_map`: B×C×h×w map + B×p×C prefix tokens -> B×(p+h·w)×C tokens."""
    patches = fmap.reshape(fmap.shape[0], fmap.shape[1], -1).transpose(1, 2)
    return torch.cat([prefix.to(patches.dtype), patches], dim=1) if prefix.shape[1] else patches


def as_map(x: Any, layout: TokenLayout | None) -> Any:
    """``x`` as a feature map: token sequences of ``layout`` become their patch-token maps;
    anything else is returned unchanged."""
    if layout is not None and layout.is_tokens(x):
        return to_map(x, layout)[0]
    return x


def map_apply(layout: TokenLayout | None,
              apply: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[nn.Module, Any], Any]:
    """Wrap ``apply(module, map) -> map`` so that token outputs pass through it as maps and the
    result is written back into the token sequence (prefix tokens unchanged)."""
    if layout is None:
        return apply

    def run(module: nn.Module, out: Any) -> Any:
        if not layout.is_tokens(out):
            return apply(module, out)
        fmap, prefix = to_map(out, layout)
        return to_tokens(apply(module, fmap), prefix)

    return run
