"""Shared pieces: ``DatasetInfo``, the ``Data`` interface, and the batch-order / DDP rules.

Ordering rule (the same for every dataset, so that DDP reproduces a single process exactly):

* Each training epoch uses ONE ``torch.Generator`` (CPU) seeded from ``(seed, epoch)``. It
  first draws the global permutation of the training set; the permutation is cut into global
  batches of ``batch_size``; for every global batch, in order, the augmentation randomness of the
  WHOLE global batch is drawn from the same generator; then rank ``r`` keeps its contiguous slice.
* Full global batches are split exactly: rank ``r`` gets ``[r*b, (r+1)*b)`` with
  ``b = batch_size // world_size`` (``batch_size`` must be divisible by ``world_size``).
* The last, incomplete training batch is KEPT (``drop_last=False``, as RepDistiller does). It is
  split as evenly as possible: rank ``r`` gets ``[r*m//W, (r+1)*m//W)`` of its ``m`` samples, so
  the concatenation over ranks is still exactly the single-process batch (local sizes differ by
  at most one). If ``m < world_size`` some rank would get no sample, so that batch is dropped on
  every rank (only then does DDP differ from one process, by fewer than W samples per epoch).
* Evaluation (``test_batches``, ``val_batches``, ``plain_train_batches``): the set in order, cut
  into global batches, each split with the even rule above; empty local slices are skipped. Every
  sample is seen exactly once across ranks, so summed statistics can be all-reduced.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "DatasetInfo", "Data", "epoch_generator", "rank_bounds", "global_batches",
    "train_steps", "balanced_subset", "DatasetNotFoundError",
]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not at any place looked; the message lists them and how to get it."""


@dataclass
class DatasetInfo:
    """What a model and a trainer need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int
    class_names: list[str] = field(default_factory=list)
    num_val: int = 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for one epoch, seeded from (seed, epoch) through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x1E7D]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


def rank_bounds(m: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of a global batch of ``m`` samples (even split)."""
    return rank * m // world_size, (rank + 1) * m // world_size


def global_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every global batch over ``n`` items in order (last one may be short)."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def train_steps(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """The training global batches (start, stop), the last one kept unless it has < W samples."""
    b = global_batches(n, batch_size)
    if b and b[-1][1] - b[-1][0] < world_size:
        b = b[:-1]
    return b


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int, seed: int, what: str = "set") -> torch.Tensor:
    """Indices (sorted) of ``n`` class-balanced samples: ``n // C`` per class, the remainder one
    each to the first classes, chosen at random with ``seed``."""
    labels = torch.as_tensor(labels)
    if n > len(labels):
        raise ValueError(f"subset of {n} {what} images asked, but the {what} has only {len(labels)}")
    per = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if per[c] > len(idx):
            raise ValueError(
                f"class-balanced subset of {n} {what} images needs {per[c]} images of class {c}, "
                f"but that class has only {len(idx)}; ask for at most {min_count_total(labels, num_classes)}"
            )
        chosen.append(idx[torch.randperm(len(idx), generator=g)[: per[c]]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def min_count_total(labels: torch.Tensor, num_classes: int) -> int:
    counts = torch.bincount(labels, minlength=num_classes)
    return int(counts.min()) * num_classes


class Data(abc.ABC):
    """Batches of one dataset for one rank. Each batch is a dict with ``images`` (float32
    N×C×H×W, normalised, on the device), ``labels`` (int64) and ``index`` (int64 positions in
    the training / test set, as CRD's memory bank needs)."""

    info: DatasetInfo
    steps_per_epoch: int
    batch_size: int          # global
    test_batch_size: int     # global
    device: torch.device
    rank: int
    world_size: int
    seed: int

    @abc.abstractmethod
    def train_batches(self, epoch: int) -> Iterator[dict]:
        """Augmented, shuffled; deterministic given (seed, epoch); this rank's part of each batch."""

    @abc.abstractmethod
    def test_batches(self) -> Iterator[dict]:
        """Un-augmented test set in order, this rank's part."""

    @abc.abstractmethod
    def plain_train_batches(self, batch_size: int) -> Iterator[dict]:
        """Un-augmented training set in order (``batch_size`` is global), this rank's part."""

    def val_batches(self) -> Iterator[dict]:
        """Un-augmented validation split in order (Tiny-ImageNet only), this rank's part."""
        raise ValueError(f"dataset {self.info.name!r} has no validation split (only tiny_imagenet has one)")

    def _check_world(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"the global batch size {self.batch_size} is not divisible by world_size {self.world_size}; "
                "choose a batch size that is a multiple of the number of processes"
            )
