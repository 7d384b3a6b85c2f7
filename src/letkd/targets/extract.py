"""Streaming per-location teacher features (METHOD §3, the input of Alg. 1 and Alg. 2).

The frozen teacher runs in eval mode under ``torch.no_grad()`` over the un-augmented training
set, one batch at a time; every spatial location of every image is one sample. A tapped map
is average-pooled to the student's H×W (adaptive pooling, METHOD §2 "spatial mismatch") and
flattened to rows ``(N·H·W) × C`` in image-major, row-major location order — the same order
as :func:`to_rows`, which the online losses use.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from letkd.models.taps import capture

__all__ = ["FeatureBatch", "RowSampler", "stream_features", "to_rows", "pool_to_size", "row_positions",
           "sample_keys", "select_rows"]


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


def row_positions(index: torch.Tensor) -> torch.Tensor:
    """Global positions of per-location rows: ``image_index · H·W + location``, from the
    per-row image index of a :class:`FeatureBatch` (each image's H·W rows are consecutive).
    In a single process over the whole set in order this is just the row counter."""
    index = index.detach().cpu().long()
    if index.numel() == 0:
        return index
    hw = int((index == index[0]).sum())
    return index * hw + torch.arange(index.numel()) % hw


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def sample_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """A uniform [0, 1) key per row, a fixed function of ``(seed, position)`` (SplitMix64).

    Keys depend on the row's global position, not on the order or the process that streamed
    it: the sample is the same in one process and sharded over DDP ranks."""
    with np.errstate(over="ignore"):
        x = positions.detach().cpu().numpy().astype(np.uint64)
        z = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64((int(seed) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53))


def select_rows(rows: torch.Tensor, extra: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor | None,
                cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cap`` rows with the smallest keys (all rows when ``cap`` or ``keys`` is None), in
    position order: how :class:`RowSampler` and its distributed merge pick their sample."""
    if cap is not None and keys is not None and len(keys) > cap:
        keep = torch.topk(keys, cap, largest=False).indices
        rows, extra, pos = rows[keep], extra[keep], pos[keep]
    order = torch.argsort(pos)
    return rows[order], extra[order]


class RowSampler:
    """Keep all streamed rows, or a uniform random sample of at most ``cap`` of them.

    Sampling (``cap`` not None) gives every row a uniform random key that is a fixed function
    of ``(seed, global row position)`` (:func:`sample_keys`) and keeps the ``cap`` rows with the
    smallest keys — a uniform sample without replacement that does not depend on the stream
    order nor on how the rows were sharded over DDP ranks. Positions default to the stream
    counter. Memory stays below ``2·cap + batch`` rows: the buffer is compacted whenever it
    exceeds ``2·cap``. Rows are stored on the CPU; :meth:`result` returns the kept rows in
    position order; :meth:`parts` gives what a distributed merge needs.
    """

    def __init__(self, cap: int | None = None, seed: int = 0) -> None:
        if cap is not None and cap < 1:
            raise ValueError(f"sample cap must be >= 1 or None, got {cap}")
        self.cap = cap
        self.seed = int(seed)
        self.seen = 0
        self._rows: list[torch.Tensor] = []
        self._extra: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._n = 0

    def add(self, rows: torch.Tensor, extra: torch.Tensor | None = None,
            positions: torch.Tensor | None = None) -> None:
        """Offer ``rows`` (n×d) with an optional aligned 1-D ``extra`` (e.g. labels) and their
        global ``positions`` (default: the stream counter)."""
        n = rows.shape[0]
        if n == 0:
            return
        self._rows.append(rows.detach().cpu())
        self._extra.append((extra if extra is not None else torch.zeros(n, dtype=torch.long)).detach().cpu())
        pos = torch.arange(self.seen, self.seen + n) if positions is None else positions.detach().cpu().long()
        if pos.shape[0] != n:
            raise ValueError(f"RowSampler.add: {n} rows but {pos.shape[0]} positions")
        self._pos.append(pos)
        if self.cap is not None:
            self._keys.append(sample_keys(self.seed, pos))
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
        """(kept rows, their extras), in position order."""
        if not self._rows:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        rows, extra, pos, keys = self.parts()
        return select_rows(rows, extra, pos, keys, self.cap)

    def parts(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The kept ``(rows, extras, positions, keys)`` (keys None when uncapped), unordered, for a
        merge across ranks with :func:`select_rows`. ``width``: the row width to use when this
        sampler saw no rows."""
        if not self._rows:
            rows = torch.empty(0, width or 0)
            return rows, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), \
                (torch.empty(0, dtype=torch.float64) if self.cap is not None else None)
        if self.cap is not None:
            self._compact()
        rows, extra, pos = torch.cat(self._rows), torch.cat(self._extra), torch.cat(self._pos)
        self._rows, self._extra, self._pos = [rows], [extra], [pos]
        keys = None
        if self.cap is not None:
            keys = torch.cat(self._keys)
            self._keys = [keys]
        return rows, extra, pos, keys
