"""Datasets, batched on-device augmentation, in-memory loader and DDP sharding.

``build(cfg.data, batch_size=..., test_batch_size=..., device=..., seed=..., rank=..., world_size=...)``
returns a ``Data`` whose ``train_batches(epoch)``, ``test_batches()``, ``plain_train_batches(bs)``
(and, for Tiny-ImageNet, ``val_batches()``) yield dicts ``{"images", "labels", "index"}``.
Batch order and the DDP split are described in ``letkd.data.base``.

Datasets and their recipes (``data.augment=auto``):

==============  ===============================================  ===============================
name            on disk                                          augmentation (auto)
==============  ===============================================  ===============================
fashion_mnist   idx files (gz or raw), zero-padded 28 -> 32      crop_flip (pad 4, zero fill)
cifar100        ``cifar-100-python/`` or its ``.tar.gz``         crop_flip (pad 4, reflect)
tiny_imagenet   ``tiny-imagenet-200/`` or its ``.zip``           rotate_flip (±20°)
imagenet        ``imagenet/{train,val}`` class folders           imagenet (RandomResizedCrop)
image_folder    ``data.train_dir`` / ``data.test_dir``           crop_flip (pad size//8, reflect)
==============  ===============================================  ===============================

Other recipes for ``data.augment``: ``none``, ``crop`` (crop_flip's pad-and-crop, never
mirrored: for digits, text and other images whose left and right differ), ``crop_flip``,
``rotate_flip``, ``imagenet`` (docs/usage.md says when to choose which).

Fashion-MNIST mean/std are those of the zero-padded 32×32 training images, computed once from
the 60,000 training images: mean 0.2190, std 0.3318 (population std over all pixels).
"""
from __future__ import annotations

import torch

from .augment import (crop, crop_flip, draw_crop, draw_crop_flip, draw_resized_crop_flip, draw_rotate_flip,
                      normalize, resized_crop_flip, rotate_flip)
from .base import (Data, DatasetInfo, DatasetNotFoundError, balanced_subset, epoch_generator, global_batches,
                   rank_bounds, train_steps)
from .formats import DataFormatError, read_cifar_pickle, read_idx, restricted_pickle_load
from .memory import InMemoryData
from .sources import (FASHION_MNIST_CLASSES, Split, find_imagenet, image_folder_channels, load_cifar100,
                      load_fashion_mnist, load_image_folder, load_tiny_imagenet, scan_image_folder)
from .stream import StreamingData, make_transforms

__all__ = [
    "DatasetInfo", "Data", "build", "InMemoryData", "StreamingData", "DatasetNotFoundError", "DataFormatError",
    "crop", "draw_crop", "crop_flip", "draw_crop_flip", "rotate_flip", "draw_rotate_flip", "resized_crop_flip",
    "draw_resized_crop_flip", "normalize", "read_idx", "read_cifar_pickle", "restricted_pickle_load",
    "balanced_subset", "epoch_generator", "rank_bounds", "global_batches", "train_steps",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "TINY_IMAGENET_MEAN", "TINY_IMAGENET_STD", "IMAGENET_MEAN", "IMAGENET_STD", "IN_MEMORY_LIMIT_BYTES",
]

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2190,), (0.3318,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3  # image_folder data up to this size is held in memory

_AUTO = {"fashion_mnist": "crop_flip", "cifar100": "crop_flip", "tiny_imagenet": "rotate_flip",
         "imagenet": "imagenet", "image_folder": "crop_flip"}


def _subset(labels: torch.Tensor, n: int, num_classes: int, seed: int, what: str) -> torch.Tensor | None:
    return balanced_subset(labels, n, num_classes, seed, what) if n > 0 else None


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Every label must be a class index 0..num_classes-1 (else CE fails deep inside torch, or worse, silently)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataFormatError(f"{what}: labels must be class indices 0..{num_classes - 1}, found {bad.numel()} "
                              f"out of range (e.g. {int(bad[0])}); the data files are corrupted or not the official ones")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    s = torch.zeros(images.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255.0
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / max(n, 1)
    std = (s2 / max(n, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(max(round(float(v), 4), 1e-4) for v in std)


def build(cfg, *, batch_size: int, test_batch_size: int, device: torch.device | str = "cpu",
          seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False) -> Data:
    """Load the dataset of ``cfg`` (a ``letkd.config.DataConfig``) and return its ``Data``.

    ``batch_size`` / ``test_batch_size`` are GLOBAL (summed over ``world_size`` ranks). The
    returned object also records ``root``, ``train_subset`` and ``subset_seed`` (None when the
    whole training set is used), which tie cached teacher statistics to the exact data.
    """
    data = _build(cfg, batch_size=batch_size, test_batch_size=test_batch_size, device=device, seed=seed,
                  rank=rank, world_size=world_size, channels_last=channels_last)
    data.root = cfg.root
    data.train_subset = cfg.train_subset or None
    data.subset_seed = cfg.subset_seed if cfg.train_subset else None
    return data


def _build(cfg, *, batch_size: int, test_batch_size: int, device: torch.device | str,
           seed: int, rank: int, world_size: int, channels_last: bool) -> Data:
    name = cfg.name
    if name not in _AUTO:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(_AUTO)}")
    augment = _AUTO[name] if cfg.augment == "auto" else cfg.augment
    common = dict(batch_size=batch_size, test_batch_size=test_batch_size, device=device, seed=seed,
                  rank=rank, world_size=world_size, channels_last=channels_last)

    if name in ("fashion_mnist", "cifar100", "tiny_imagenet"):
        native = {"fashion_mnist": 32, "cifar100": 32, "tiny_imagenet": 64}[name]
        if cfg.image_size not in (0, native):
            raise ValueError(f"data.image_size={cfg.image_size} is not supported for {name} (its images are "
                             f"{native}×{native}); leave it 0 (it is used by image_folder and imagenet)")
        val = None
        if name == "fashion_mnist":
            train, test = load_fashion_mnist(cfg.root, cfg.download)
            names, ch, mean, std, pad_mode = FASHION_MNIST_CLASSES, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "zeros"
        elif name == "cifar100":
            train, test, names = load_cifar100(cfg.root, cfg.download)
            ch, mean, std, pad_mode = 3, CIFAR100_MEAN, CIFAR100_STD, "reflect"
        else:
            train, val, test, names = load_tiny_imagenet(cfg.root)
            ch, mean, std, pad_mode = 3, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, "reflect"
        nc = len(names)
        for split_name, split in (("training", train), ("validation", val), ("test", test)):
            if split is not None:
                _check_labels(split.labels, nc, f"{name} {split_name} set (data.root={cfg.root})")
        if (i := _subset(train.labels, cfg.train_subset, nc, cfg.subset_seed, "training set")) is not None:
            train = train.subset(i)
        if (i := _subset(test.labels, cfg.test_subset, nc, cfg.subset_seed, "test set")) is not None:
            test = test.subset(i)
        info = DatasetInfo(name, nc, ch, (native, native), mean, std, len(train), len(test), list(names),
                           num_val=len(val) if val is not None else 0)
        return InMemoryData(info, train, test, val, augment=augment, pad_mode=pad_mode, **common)

    if name == "imagenet":
        train_dir, test_dir = find_imagenet(cfg.root)
    else:
        if not cfg.train_dir or not cfg.test_dir:
            raise ValueError("data.name=image_folder needs data.train_dir and data.test_dir "
                             "(each a folder with one sub-folder of images per class)")
        train_dir, test_dir = cfg.train_dir, cfg.test_dir
    classes, tr = scan_image_folder(train_dir)
    _, te = scan_image_folder(test_dir, classes)
    nc = len(classes)
    if (i := _subset(torch.tensor([y for _, y in tr]), cfg.train_subset, nc, cfg.subset_seed, "training set")) is not None:
        tr = [tr[j] for j in i.tolist()]
    if (i := _subset(torch.tensor([y for _, y in te]), cfg.test_subset, nc, cfg.subset_seed, "test set")) is not None:
        te = [te[j] for j in i.tolist()]

    if name == "image_folder":
        size = cfg.image_size or 32
        ch = image_folder_channels(tr)
        if (len(tr) + len(te)) * ch * size * size <= IN_MEMORY_LIMIT_BYTES:
            train, test = load_image_folder(tr, size, ch), load_image_folder(te, size, ch)
            mean, std = _channel_stats(train.images)
            info = DatasetInfo(name, nc, ch, (size, size), mean, std, len(train), len(test), classes)
            return InMemoryData(info, train, test, augment=augment, pad_mode="reflect", **common)
        # too large for memory: stream it (ImageNet statistics, images squashed to size×size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if ch == 3 else ((0.5,), (0.25,))
        train_tf, test_tf = make_transforms(augment, size, None, squash=True)
    else:
        size, ch, mean, std = cfg.image_size or 224, 3, IMAGENET_MEAN, IMAGENET_STD
        train_tf, test_tf = make_transforms(augment, size, round(size * 256 / 224))
    info = DatasetInfo(name, nc, ch, (size, size), mean, std, len(tr), len(te), classes)
    return StreamingData(info, tr, te, train_transform=train_tf, test_transform=test_tf,
                         num_workers=cfg.num_workers, **common)
