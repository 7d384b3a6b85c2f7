"""Small-image datasets held in memory as one uint8 tensor on the training device.

Augmentation is batched on that device (see ``augment``); the batch order and the DDP split
follow the rules in ``base``.
"""
from __future__ import annotations

from typing import Iterator

import torch

from . import augment as A
from .base import Data, DatasetInfo, epoch_generator, global_batches, rank_bounds, train_steps
from .sources import Split

__all__ = ["InMemoryData", "AUGMENTS"]

AUGMENTS = ("none", "crop", "crop_flip", "rotate_flip", "imagenet")


class InMemoryData(Data):
    """``Data`` over in-memory splits; ``augment`` is one of ``AUGMENTS``.

    crop_flip pads by ``pad`` (default H // 8, i.e. 4 for 32×32) with ``pad_mode`` ("reflect" or
    "zeros"), crops back at a random offset and flips half the images; crop does the same
    without the flip; rotate_flip rotates uniformly in ±``degrees``; imagenet is a batched
    RandomResizedCrop (scale 0.08..1) back to H×W + flip.
    """

    def __init__(self, info: DatasetInfo, train: Split, test: Split, val: Split | None = None, *,
                 augment: str = "crop_flip", pad: int | None = None, pad_mode: str = "reflect",
                 degrees: float = 20.0, batch_size: int = 64, test_batch_size: int = 100,
                 device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.info, self.augment = info, augment
        self.batch_size, self.test_batch_size = int(batch_size), int(test_batch_size)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.channels_last = channels_last
        self._check_world()
        H = int(train.images.shape[2])
        self.pad = max(1, H // 8) if pad is None else int(pad)
        self.pad_mode, self.degrees = pad_mode, float(degrees)
        self._splits = {k: (s.images.to(self.device), s.labels.to(self.device))
                        for k, s in (("train", train), ("test", test), ("val", val)) if s is not None}
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.steps_per_epoch = len(train_steps(len(train), self.batch_size, self.world_size))

    # -------------------------------------------------------------------------------------
    def _finish(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict:
        x = (images.float() * (1.0 / 255.0) - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"images": x, "labels": labels, "index": index}

    def _draw(self, g: torch.Generator, m: int) -> tuple:
        if self.augment == "crop":
            return (A.draw_crop(g, m, self.pad),)
        if self.augment == "crop_flip":
            return A.draw_crop_flip(g, m, self.pad)
        if self.augment == "rotate_flip":
            return A.draw_rotate_flip(g, m, self.degrees)
        if self.augment == "imagenet":
            _, _, H, W = self._splits["train"][0].shape
            return A.draw_resized_crop_flip(g, m, H, W)
        return ()

    def _augment(self, data: torch.Tensor, idx: torch.Tensor, draws: tuple) -> torch.Tensor:
        if self.augment == "crop":
            return A.crop(data, self.pad, *draws, mode=self.pad_mode, index=idx)
        if self.augment == "crop_flip":
            return A.crop_flip(data, self.pad, *draws, mode=self.pad_mode, index=idx)
        if self.augment == "rotate_flip":
            return A.rotate_flip(data[idx], *draws)
        if self.augment == "imagenet":
            return A.resized_crop_flip(data[idx], *draws, size=tuple(data.shape[2:]))
        return data[idx]

    def train_batches(self, epoch: int) -> Iterator[dict]:
        """Augmented, shuffled batches of this rank for ``epoch`` (see ``base`` for the rules)."""
        data, labels = self._splits["train"]
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(len(labels), generator=g)
        for s, e in train_steps(len(labels), self.batch_size, self.world_size):
            draws = self._draw(g, e - s)  # for the whole global batch, before slicing
            lo, hi = rank_bounds(e - s, self.rank, self.world_size)
            idx = perm[s + lo:s + hi].to(self.device)
            mine = tuple(d[lo:hi] for d in draws)
            yield self._finish(self._augment(data, idx, mine), labels[idx], idx)

    def _ordered(self, split: str, batch_size: int) -> Iterator[dict]:
        data, labels = self._splits[split]
        for s, e in global_batches(len(labels), int(batch_size)):
            lo, hi = rank_bounds(e - s, self.rank, self.world_size)
            if hi > lo:
                idx = torch.arange(s + lo, s + hi, device=self.device)
                yield self._finish(data[s + lo:s + hi], labels[s + lo:s + hi], idx)

    def test_batches(self) -> Iterator[dict]:
        return self._ordered("test", self.test_batch_size)

    def val_batches(self) -> Iterator[dict]:
        if "val" not in self._splits:
            return super().val_batches()
        return self._ordered("val", self.test_batch_size)

    def plain_train_batches(self, batch_size: int) -> Iterator[dict]:
        return self._ordered("train", batch_size)
