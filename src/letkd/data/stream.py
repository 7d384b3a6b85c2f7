"""ImageNet-scale data: files decoded by DataLoader workers with torchvision transforms.

The batch order and DDP split follow ``base``: a per-epoch permutation from the (seed, epoch)
generator, global batches, then a per-sample seed for the WHOLE global batch drawn from the same
generator; each sample's random transform runs under its own seed (inside ``fork_rng``, so the
process RNG is untouched). Hence results do not depend on the number of workers or processes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .base import Data, DatasetInfo, epoch_generator, global_batches, rank_bounds, train_steps

__all__ = ["FileDataset", "StreamingData", "make_transforms"]


class FileDataset(Dataset):
    """(path, label) samples; items are ``(index, seed or -1)`` -> (uint8 C×H×W, label, index)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, channels: int = 3) -> None:
        self.samples, self.transform, self.mode = samples, transform, ("L" if channels == 1 else "RGB")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        from PIL import Image
        idx, seed = item
        path, label = self.samples[idx]
        with Image.open(path) as im:
            im = im.convert(self.mode)
            if seed < 0:
                x = self.transform(im)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    x = self.transform(im)
        return x, label, idx


def make_transforms(augment: str, size: int, resize: int | None, squash: bool = False) -> tuple[Callable, Callable]:
    """(train, test) torchvision transforms ending in uint8 tensors.

    Test: resize the short side to ``resize`` then centre-crop ``size`` (ImageNet: 256 -> 224),
    or, with ``squash``, resize to size×size.
    """
    import torchvision.transforms as T
    I = T.InterpolationMode.BILINEAR
    base = [T.Resize((size, size), interpolation=I)] if squash else [T.Resize(resize or size, interpolation=I), T.CenterCrop(size)]
    test = T.Compose(base + [T.PILToTensor()])
    if augment == "imagenet":
        train = [T.RandomResizedCrop(size, interpolation=I), T.RandomHorizontalFlip()]
    elif augment == "crop":
        train = base + [T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect")]
    elif augment == "crop_flip":
        train = base + [T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"), T.RandomHorizontalFlip()]
    elif augment == "rotate_flip":
        train = base + [T.RandomRotation(20, interpolation=I), T.RandomHorizontalFlip()]
    elif augment == "none":
        train = list(base)
    else:
        raise ValueError(f"augment must be one of none, crop, crop_flip, rotate_flip, imagenet; got {augment!r}")
    return T.Compose(train + [T.PILToTensor()]), test


class StreamingData(Data):
    """``Data`` over image files read by a ``DataLoader`` with ``num_workers`` workers."""

    def __init__(self, info: DatasetInfo, train: list[tuple[str, int]], test: list[tuple[str, int]], *,
                 train_transform: Callable, test_transform: Callable, batch_size: int = 256,
                 test_batch_size: int = 100, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, num_workers: int = 4) -> None:
        self.info = info
        self.batch_size, self.test_batch_size = int(batch_size), int(test_batch_size)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.channels_last, self.num_workers = channels_last, int(num_workers)
        self._check_world()
        ch = info.in_channels
        self._train = FileDataset(train, train_transform, ch)
        self._train_plain = FileDataset(train, test_transform, ch)
        self._test = FileDataset(test, test_transform, ch)
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.steps_per_epoch = len(train_steps(len(train), self.batch_size, self.world_size))

    def _load(self, ds: FileDataset, batches: list[list[tuple[int, int]]]) -> Iterator[dict]:
        loader = DataLoader(ds, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        nb = self.device.type == "cuda"
        for x, y, i in loader:
            x = x.to(self.device, non_blocking=nb)
            x = (x.float() * (1.0 / 255.0) - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"images": x, "labels": y.to(self.device, non_blocking=nb), "index": i.to(self.device, non_blocking=nb)}

    def train_batches(self, epoch: int) -> Iterator[dict]:
        n = len(self._train)
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(n, generator=g)
        batches = []
        for s, e in train_steps(n, self.batch_size, self.world_size):
            seeds = torch.randint(0, 2**62, (e - s,), generator=g)  # the whole global batch
            lo, hi = rank_bounds(e - s, self.rank, self.world_size)
            batches.append(list(zip(perm[s + lo:s + hi].tolist(), seeds[lo:hi].tolist())))
        return self._load(self._train, batches)

    def _ordered(self, ds: FileDataset, batch_size: int) -> Iterator[dict]:
        batches = []
        for s, e in global_batches(len(ds), int(batch_size)):
            lo, hi = rank_bounds(e - s, self.rank, self.world_size)
            if hi > lo:
                batches.append([(i, -1) for i in range(s + lo, s + hi)])
        return self._load(ds, batches)

    def test_batches(self) -> Iterator[dict]:
        return self._ordered(self._test, self.test_batch_size)

    def plain_train_batches(self, batch_size: int) -> Iterator[dict]:
        return self._ordered(self._train_plain, batch_size)
