"""Streaming per-location teacher features (METHOD §3, the input of Alg. 1 and Alg. 2).

The frozen teacher runs in eval mode under ``torch.no_grad()`` over the un-augmented training
set, one batch at a time; every spatial location of every image is one sample. A tapped map
is average-pooled to the student's H×W (adaptive pooling, METHOD §2 "spatial mismatch") and
flattened to rows ``(N·H·W) × C`` in image-major, row-major location order — the same order
as :func:`to_rows`, which the online losses use.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from letkd.models.taps import capture

__all__ = ["FeatureBatch", "RowSampler", "stream_features", "to_rows", "pool_to_size"]


class FeatureBatch(NamedTuple):
    """One batch of per-location features. All dicts are keyed by tap name:
    ``feats[name]``: (N·H·W)×C float32; ``labels[name]`` / ``index[name]``: the image's class
    label / dataset index repeated for each of its H·W locations (taps may differ in H·W)."""

    feats: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]


def pool_to_size(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Adaptive average pooling of a B×C×H×W map to ``size`` (no-op when None or equal)."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, tuple(size))


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W -> (B·H·W)×C, one row per location (image-major, then row-major)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["images"], batch["labels"], batch.get("index")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], batch[2] if len(batch) > 2 else None
    raise TypeError(f"a batch must be a dict with 'images' and 'labels' (or a tuple), got {type(batch).__name__}")


def stream_features(teacher: nn.Module, batches: Iterable[Any], paths: Mapping[str, str],
                    pool_to: Mapping[str, tuple[int, int] | None] | None = None) -> Iterator[FeatureBatch]:
    """Yield the teacher's per-location features batch by batch (METHOD §3).

    ``paths``: ``{name: module path}`` of the teacher; ``pool_to``: ``{name: (H, W) or None}``.
    Features stay on the teacher's device, as float32. The teacher's train/eval mode is
    restored when the generator finishes.
    """
    pool_to = dict(pool_to or {})
    p = next(iter(teacher.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    seen = 0
    try:
        with capture(teacher, dict(paths)) as cap:
            for batch in batches:
                images, labels, index = _batch_parts(batch)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device)
                if index is None:
                    index = torch.arange(seen, seen + len(labels))
                index = index.to(device)
                seen += len(labels)
                with torch.no_grad():
                    cap.clear()
                    teacher(images)
                feats, lab, idx = {}, {}, {}
                for name in paths:
                    fmap = pool_to_size(cap[name].float(), pool_to.get(name))
                    hw = fmap.shape[-2] * fmap.shape[-1]
                    feats[name] = to_rows(fmap)
                    lab[name] = labels.repeat_interleave(hw)
                    idx[name] = index.repeat_interleave(hw)
                yield FeatureBatch(feats, lab, idx)
    finally:
        teacher.train(was_training)


class RowSampler:
    """Keep all streamed rows, or a uniform random sample of at most ``cap`` of them.

    Sampling (``cap`` not None) gives every row an i.i.d. uniform random key (from a generator
    seeded with ``seed``) and keeps the ``cap`` rows with the smallest keys — a uniform sample
    without replacement, deterministic for a given stream order and seed. Memory stays below
    ``2·cap + batch`` rows: the buffer is compacted whenever it exceeds ``2·cap``. Rows are
    stored on the CPU; :meth:`result` returns the kept rows in stream order.
    """

    def __init__(self, cap: int | None = None, seed: int = 0) -> None:
        if cap is not None and cap < 1:
            raise ValueError(f"sample cap must be >= 1 or None, got {cap}")
        self.cap = cap
        self.gen = torch.Generator().manual_seed(int(seed))
        self.seen = 0
        self._rows: list[torch.Tensor] = []
        self._extra: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._n = 0

    def add(self, rows: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Offer ``rows`` (n×d) with an optional aligned 1-D ``extra`` (e.g. labels)."""
        n = rows.shape[0]
        if n == 0:
            return
        self._rows.append(rows.detach().cpu())
        self._extra.append((extra if extra is not None else torch.zeros(n, dtype=torch.long)).detach().cpu())
        self._pos.append(torch.arange(self.seen, self.seen + n))
        if self.cap is not None:
            self._keys.append(torch.rand(n, generator=self.gen, dtype=torch.float64))
        self.seen += n
        self._n += n
        if self.cap is not None and self._n > 2 * self.cap:
            self._compact()

    def _compact(self) -> None:
        rows, extra, pos = torch.cat(self._rows), torch.cat(self._extra), torch.cat(self._pos)
        keys = torch.cat(self._keys)
        if self.cap is not None and len(keys) > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            rows, extra, pos, keys = rows[keep], extra[keep], pos[keep], keys[keep]
        self._rows, self._extra, self._pos, self._keys = [rows], [extra], [pos], [keys]
        self._n = len(pos)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept rows, their extras), in stream order."""
        if not self._rows:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        if self.cap is not None:
            self._compact()
        rows, extra, pos = torch.cat(self._rows), torch.cat(self._extra), torch.cat(self._pos)
        order = torch.argsort(pos)
        self._rows, self._extra, self._pos = [rows], [extra], [pos]
        if self.cap is not None:
            self._keys = [torch.cat(self._keys)]
        return rows[order], extra[order]
