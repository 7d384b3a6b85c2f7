"""Batched on-device augmentation for in-memory image tensors.

Every augmentation is split in two: ``draw_*`` takes the random decisions for a whole batch
from a ``torch.Generator`` (on the CPU, so they are the same on every device and every DDP
rank), and the function of the same name without ``draw_`` applies given decisions to a batch
with tensor ops only (no per-image Python). Tests feed the same decisions to a per-image
reference.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "draw_crop", "crop", "draw_crop_flip", "crop_flip", "draw_rotate_flip", "rotate_flip",
    "draw_resized_crop_flip", "resized_crop_flip", "normalize",
]


# ----------------------------------------------------------------------- random crop + flip
def draw_crop_flip(generator: torch.Generator, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` crop offsets (top, left) in ``[0, 2*pad]`` and horizontal flips (p=0.5).

    Draw order (part of the reproducibility contract): offsets ``(n, 2)`` first, then flips.
    """
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def _coords(size: int, offset: torch.Tensor, pad: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source coordinates (n, size) for a crop at ``offset`` of the padded image."""
    c = torch.arange(size, device=offset.device)[None, :] + offset[:, None] - pad
    if mode == "reflect":
        c = (size - 1) - ((size - 1) - c.abs()).abs()  # reflect without repeating the edge
        return c, None
    valid = (c >= 0) & (c < size)
    return c.clamp(0, size - 1), valid


def crop_flip(images: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor, *,
              mode: str = "reflect", index: torch.Tensor | None = None) -> torch.Tensor:
    """Pad by ``pad`` (``reflect`` or ``zeros``), crop back to H×W at ``offsets``, flip where ``flips``.

    Equivalent per image to ``F.pad(x, [pad]*4, mode)[:, t:t+H, l:l+W]`` then ``flip(-1)``, done
    as one gather. ``index`` (optional) selects the batch rows of ``images`` inside the gather,
    so a batch can be augmented straight out of the whole in-memory dataset.
    Returns a tensor of ``images.dtype``, shape ``(n, C, H, W)``.
    """
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"crop_flip mode must be 'reflect' or 'zeros', got {mode!r}")
    _, C, H, W = images.shape
    if mode == "reflect" and pad >= min(H, W):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad}, got {H}×{W}")
    dev = images.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    n = offsets.shape[0]
    rows, vr = _coords(H, offsets[:, 0], pad, mode)
    cols, vc = _coords(W, offsets[:, 1], pad, mode)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    n_idx = (torch.arange(n, device=dev) if index is None else index.to(dev))[:, None, None, None]
    c_idx = torch.arange(C, device=dev)[None, :, None, None]
    out = images[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if mode == "zeros":
        vc = torch.where(flips[:, None], vc.flip(1), vc)
        mask = vr[:, None, :, None] & vc[:, None, None, :]
        out = torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=dev))
    return out


# ---------------------------------------------------------------- random crop only (no flip)
def draw_crop(generator: torch.Generator, n: int, pad: int) -> torch.Tensor:
    """Draw ``n`` crop offsets (top, left) in ``[0, 2*pad]``; nothing else (no flip is drawn)."""
    return torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)


def crop(images: torch.Tensor, pad: int, offsets: torch.Tensor, *, mode: str = "reflect",
         index: torch.Tensor | None = None) -> torch.Tensor:
    """Pad by ``pad`` and crop back to H×W at ``offsets``, never mirrored: :func:`crop_flip`
    with every flip off (for digits, text and other images whose left and right differ)."""
    flips = torch.zeros(offsets.shape[0], dtype=torch.bool)
    return crop_flip(images, pad, offsets, flips, mode=mode, index=index)


# -------------------------------------------------------------------- random rotation + flip
def draw_rotate_flip(generator: torch.Generator, n: int, degrees: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` angles uniform in ``[-degrees, degrees]`` and horizontal flips (p=0.5), in that order."""
    angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    flips = torch.rand(n, generator=generator) < 0.5
    return angles.float(), flips


def rotate_flip(images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
    """Rotate each image counter-clockwise by ``angles`` degrees about its centre (bilinear,
    outside filled with ``fill``), then flip horizontally where ``flips``. Float in, float out
    (uint8 input is converted to float32). Matches ``torchvision.transforms.functional.rotate``
    (bilinear) followed by ``hflip``.
    """
    x = images if images.is_floating_point() else images.float()
    n, _, H, W = x.shape
    a = torch.deg2rad(angles.to(x.device, torch.float32))
    cos, sin = torch.cos(a), torch.sin(a)
    sign = torch.where(flips.to(x.device), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    # output (normalised) -> input: inverse rotation in pixel units; flip mirrors the output x
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin * (H / W)
    theta[:, 1, 0] = sin * (W / H) * sign
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if fill == 0:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = out[:, -1:]
    return out[:, :-1] + (1 - m) * fill


# ---------------------------------------------------------- random resized crop + flip (batched)
def draw_resized_crop_flip(generator: torch.Generator, n: int, height: int, width: int,
                           scale: tuple[float, float] = (0.08, 1.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3),
                           attempts: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw crop boxes ``(n, 4)`` = (top, left, h, w) as torchvision's ``RandomResizedCrop``
    does (first of ``attempts`` valid tries, else the centre crop clamped to ``ratio``), then flips."""
    area = height * width
    s = torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator) * area
    logr = torch.empty(n, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    w = torch.round(torch.sqrt(s * r))
    h = torch.round(torch.sqrt(s / r))
    u = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    boxes = torch.empty(n, 4, dtype=torch.float64)
    # fallback: centre crop with the ratio clamped
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    fb = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
    i = first.clamp(min=0)
    rows = torch.arange(n)
    hh, ww = h[rows, i], w[rows, i]
    top = torch.floor(u[rows, i, 0] * (height - hh + 1))
    left = torch.floor(u[rows, i, 1] * (width - ww + 1))
    boxes[:] = torch.stack([top, left, hh, ww], 1)
    boxes[first < 0] = fb
    flips = torch.rand(n, generator=generator) < 0.5
    return boxes.float(), flips


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                      size: Sequence[int] | int) -> torch.Tensor:
    """Crop each box (top, left, h, w in pixels), resize it bilinearly to ``size`` and flip."""
    x = images if images.is_floating_point() else images.float()
    n, C, H, W = x.shape
    oh, ow = (size, size) if isinstance(size, int) else tuple(size)
    b = boxes.to(x.device, torch.float32)
    top, left, h, w = b.unbind(1)
    sign = torch.where(flips.to(x.device), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = w / W * sign
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [n, C, oh, ow], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------ normalisation
def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float in 0..255) images -> float32 ``(x/255 - mean) / std``."""
    x = images.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x * (1.0 / 255.0) - m) / s
