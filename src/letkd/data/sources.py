"""Find and read each dataset in its official on-disk layout into uint8 tensors (or file lists).

Every ``load_*`` function looks in a fixed list of places and, when the data is in none of them,
raises ``DatasetNotFoundError`` naming every place looked and how to get the data.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DatasetNotFoundError
from .formats import DataFormatError, read_cifar_pickle, read_idx, safe_extract_tar, safe_extract_zip

__all__ = [
    "Split", "FASHION_MNIST_SYSTEM_DIR", "FASHION_MNIST_CLASSES", "load_fashion_mnist", "load_cifar100",
    "load_tiny_imagenet", "scan_image_folder", "load_image_folder", "find_imagenet", "IMG_EXTENSIONS",
]

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Split:
    """One split held in memory: uint8 images N×C×H×W and int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])


def _not_found(what: str, looked: list[str], how: str, download_note: str = "") -> DatasetNotFoundError:
    places = "\n".join(f"  - {p}" for p in looked)
    note = f"\n{download_note}" if download_note else ""
    return DatasetNotFoundError(f"{what} not found. Looked in:\n{places}{note}\nTo get it: {how}")


def _try_download(download: bool, fetch, what: str) -> str:
    """Run ``fetch`` (a torchvision download) when ``data.download`` is on; return a line saying
    what was tried and how it ended (or that nothing was tried)."""
    if not download:
        return "Not downloaded: data.download=false, so no download was tried."
    try:
        fetch()
    except Exception as e:  # noqa: BLE001 - no internet, read-only root, bad checksum, ...
        return f"Tried (data.download=true): {what}; it failed: {type(e).__name__}: {e}"
    return f"Tried (data.download=true): {what}; it finished, but the files above are still not there."


def _how(download: bool, manual: str) -> str:
    """How to get the data, given the ``data.download`` setting that was in force."""
    if download:
        return (f"{manual}. data.download is already true and the attempt above did not give the files: fix what "
                f"it reports (e.g. no internet access here, data.root not writable) or place the files yourself "
                f"(data.download=false then skips the attempt)")
    return f"{manual}, or set data.download=true to let torchvision download it (needs internet access)"


# ------------------------------------------------------------------------------ Fashion-MNIST
_FM_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def _fm_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FM_FILES.items():
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def _fm_read(files: dict[str, Path]) -> tuple[Split, Split]:
    out = []
    for split in ("train", "test"):
        x = read_idx(files[f"{split}_images"], expect_ndim=3)
        y = read_idx(files[f"{split}_labels"], expect_ndim=1)
        if x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DataFormatError(f"{files[f'{split}_images']}: expected uint8 images of 28×28, got {x.dtype} {x.shape[1:]}")
        if len(x) != len(y):
            raise DataFormatError(f"{files[f'{split}_images']} has {len(x)} images but {files[f'{split}_labels']} has {len(y)} labels")
        if len(y) and int(y.max()) > 9:
            raise DataFormatError(f"{files[f'{split}_labels']}: labels must be 0..9, found {int(y.max())}")
        img = torch.zeros(len(x), 1, 32, 32, dtype=torch.uint8)
        img[:, 0, 2:30, 2:30] = torch.from_numpy(x)  # zero-pad 28×28 -> 32×32 at load time
        out.append(Split(img, torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]


def load_fashion_mnist(root: str, download: bool, system_dir: str = FASHION_MNIST_SYSTEM_DIR) -> tuple[Split, Split]:
    """Fashion-MNIST (idx files, gz or raw), zero-padded to 32×32; (train, test)."""
    r = Path(root)
    candidates = [r / "FashionMNIST" / "raw", r / "fashion-mnist", r / "fashion_mnist", r, Path(system_dir)]
    for folder in candidates:
        files = _fm_files(folder)
        if files:
            return _fm_read(files)
    url = "https://github.com/zalandoresearch/fashion-mnist"
    raw = r / "FashionMNIST" / "raw"

    def fetch() -> None:
        import torchvision
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(r), train=train, download=True)

    note = _try_download(download, fetch, f"torchvision.datasets.FashionMNIST(download=True) into {raw}")
    if download and (files := _fm_files(raw)):
        return _fm_read(files)
    names = ", ".join(f"{s}[.gz]" for s in _FM_FILES.values())
    raise _not_found(
        f"Fashion-MNIST (the 4 idx files {names})", [str(c) for c in candidates],
        _how(download, "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs into "
             f"{system_dir}), or copy the files from {url} into {raw}"),
        note,
    )


# ---------------------------------------------------------------------------------- CIFAR-100
def _cifar_read(folder: Path) -> tuple[Split, Split, list[str]]:
    meta = read_cifar_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise DataFormatError(f"{folder / 'meta'}: expected key 'fine_label_names', found {sorted(meta)}")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    if len(names) != 100:
        raise DataFormatError(f"{folder / 'meta'}: expected 100 fine label names, got {len(names)}")
    splits = []
    for split in ("train", "test"):
        d = read_cifar_pickle(folder / split)
        missing = {"data", "fine_labels"} - set(d)
        if missing:
            raise DataFormatError(f"{folder / split}: missing key(s) {sorted(missing)} (found {sorted(d)})")
        x = np.asarray(d["data"])
        y = np.asarray(d["fine_labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise DataFormatError(f"{folder / split}: 'data' must be uint8 N×3072, got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise DataFormatError(f"{folder / split}: {len(x)} images but {len(y)} fine_labels")
        if len(y) and (y.min() < 0 or y.max() > 99):
            bad = y[(y < 0) | (y > 99)]
            raise DataFormatError(f"{folder / split}: fine_labels must be 0..99 (CIFAR-100 has 100 classes); found "
                                  f"{len(bad)} out-of-range label(s), e.g. {int(bad[0])}; the file is not the "
                                  f"official CIFAR-100 one (download it again)")
        splits.append(Split(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)))
    return splits[0], splits[1], names


def _has_cifar(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("train", "test", "meta"))


def load_cifar100(root: str, download: bool) -> tuple[Split, Split, list[str]]:
    """CIFAR-100 python version (``cifar-100-python/`` or its ``.tar.gz``); (train, test, names)."""
    r = Path(root)
    folder = r / "cifar-100-python"
    tar = r / "cifar-100-python.tar.gz"
    looked = [str(folder), f"{r} (files train, test, meta)", str(tar)]
    for f in (folder, r):
        if _has_cifar(f):
            return _cifar_read(f)
    if tar.is_file():
        safe_extract_tar(tar, r, prefix="cifar-100-python")
        if _has_cifar(folder):
            return _cifar_read(folder)
        raise DataFormatError(f"{tar}: extracted, but {folder} has no train/test/meta files")

    def fetch() -> None:
        import torchvision
        torchvision.datasets.CIFAR100(str(r), train=True, download=True)

    note = _try_download(download, fetch, f"torchvision.datasets.CIFAR100(download=True) into {r}")
    if download and _has_cifar(folder):
        return _cifar_read(folder)
    raise _not_found(
        "CIFAR-100 (python version)", looked,
        _how(download, f"download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into {r} "
             "(it is found as is, or extracted)"),
        note,
    )


# ------------------------------------------------------------------------------ Tiny-ImageNet
_TINY_CACHE = "letkd-uint8-cache-v1.pt"


def _decode_rgb(path: Path) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise DataFormatError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def _decode_many(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(len(paths), 3, *size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        img = _decode_rgb(p)
        if tuple(img.shape[1:]) != size:
            raise DataFormatError(f"{p}: expected a {size[0]}×{size[1]} image, got {tuple(img.shape[1:])}")
        out[i] = img
    return out


def _tiny_fingerprint(folder: Path, wnids: list[str]) -> str:
    h = hashlib.sha256("\n".join(wnids).encode())
    h.update((folder / "val" / "val_annotations.txt").read_bytes())
    for w in wnids:
        d = folder / "train" / w / "images"
        h.update(f"{w}:{len(os.listdir(d)) if d.is_dir() else -1};".encode())
    return h.hexdigest()


def _tiny_read(folder: Path) -> tuple[Split, Split, Split, list[str]]:
    wnids = sorted(line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip())
    if not wnids:
        raise DataFormatError(f"{folder / 'wnids.txt'}: no class ids")
    words = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text(errors="replace").splitlines():
            parts = line.split("\t", 1)
            if len(parts) == 2:
                words[parts[0].strip()] = parts[1].split(",")[0].strip()
    names = [words.get(w, w) for w in wnids]
    fp = _tiny_fingerprint(folder, wnids)
    cache = folder / _TINY_CACHE
    if cache.is_file():
        try:
            c = torch.load(cache, weights_only=True, map_location="cpu")
            if c.get("fingerprint") == fp:
                sp = [Split(c[f"{s}_images"], c[f"{s}_labels"]) for s in ("train", "val", "test")]
                return sp[0], sp[1], sp[2], names
        except Exception as e:
            warnings.warn(f"ignoring unreadable cache {cache}: {e}")
    cls = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise DataFormatError(f"{folder}: expected the folder train/{w}/images for class {w} of wnids.txt")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        train_paths += files
        train_labels += [cls[w]] * len(files)
    by_class: dict[int, list[str]] = {i: [] for i in range(len(wnids))}
    for n, line in enumerate((folder / "val" / "val_annotations.txt").read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in cls:
            raise DataFormatError(
                f"{folder / 'val' / 'val_annotations.txt'} line {n}: expected '<file>\\t<wnid>\\t...' "
                f"with a wnid from wnids.txt, got {line!r}")
        by_class[cls[parts[1]]].append(parts[0])
    val_p, val_y, test_p, test_y = [], [], [], []
    for c, files in by_class.items():
        files = sorted(files)  # plain sort by file name: first half -> val, rest -> test
        half = len(files) // 2
        val_p += [folder / "val" / "images" / f for f in files[:half]]
        val_y += [c] * half
        test_p += [folder / "val" / "images" / f for f in files[half:]]
        test_y += [c] * (len(files) - half)
    sp = [Split(_decode_many(p, (64, 64)), torch.tensor(y, dtype=torch.int64))
          for p, y in ((train_paths, train_labels), (val_p, val_y), (test_p, test_y))]
    try:
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"fingerprint": fp, **{f"{s}_{k}": getattr(x, k) for s, x in zip(("train", "val", "test"), sp)
                                          for k in ("images", "labels")}}, tmp)
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not write the decoded Tiny-ImageNet cache {cache}: {e}")
    return sp[0], sp[1], sp[2], names


def load_tiny_imagenet(root: str) -> tuple[Split, Split, Split, list[str]]:
    """Tiny-ImageNet-200 (folder or zip); (train, val, test, class names).

    The 50 official validation images of each class, sorted by file name, are split in two:
    the first half (25) is our validation split, the rest (25) our test split.
    """
    r = Path(root)
    folder = r / "tiny-imagenet-200"
    zp = r / "tiny-imagenet-200.zip"

    def ok(f: Path) -> bool:
        return (f / "wnids.txt").is_file() and (f / "val" / "val_annotations.txt").is_file()

    for f in (folder, r):
        if ok(f):
            return _tiny_read(f)
    if zp.is_file():
        safe_extract_zip(zp, r)
        if ok(folder):
            return _tiny_read(folder)
        raise DataFormatError(f"{zp}: extracted, but {folder} lacks wnids.txt / val/val_annotations.txt")
    raise _not_found(
        "Tiny-ImageNet-200", [str(folder), f"{r} (wnids.txt, train/, val/)", str(zp)],
        f"download http://cs231n.stanford.edu/tiny-imagenet-200.zip into {r} (it is extracted on first use); "
        "torchvision has no downloader for it",
    )


# --------------------------------------------------------------------- ImageFolder-style data
def scan_image_folder(folder: str | os.PathLike, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and (path, label) samples, files sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataFormatError(f"{folder}: expected one sub-folder per class (ImageFolder layout), found none")
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataFormatError(
            f"{folder}: its class folders must be those of the training folder; "
            f"missing: {missing or 'none'}; unexpected: {extra or 'none'}")
    samples = []
    for i, c in enumerate(found):
        files = []
        for dirpath, _, names in os.walk(folder / c, followlinks=True):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        samples += [(p, i) for p in sorted(files)]
    if not samples:
        raise DataFormatError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return found, samples


def load_image_folder(samples: list[tuple[str, int]], size: int, channels: int) -> Split:
    """Decode and resize (bilinear, to size×size) every image into one uint8 tensor."""
    from PIL import Image
    out = torch.empty(len(samples), channels, size, size, dtype=torch.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, (p, _) in enumerate(samples):
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((size, size), Image.BILINEAR)
        except Exception as e:
            raise DataFormatError(f"{p}: cannot read the image ({type(e).__name__}: {e})") from e
        a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        out[i] = a[None] if channels == 1 else a.permute(2, 0, 1)
    return Split(out, torch.tensor([y for _, y in samples], dtype=torch.int64))


def image_folder_channels(samples: list[tuple[str, int]], limit: int = 64) -> int:
    """1 if the first ``limit`` images are all greyscale, else 3."""
    from PIL import Image
    for p, _ in samples[:limit]:
        with Image.open(p) as im:
            if im.mode not in ("L", "1", "I;16", "I"):
                return 3
    return 1


def find_imagenet(root: str) -> tuple[Path, Path]:
    """The train/ and val/ ImageFolder directories of ImageNet under ``root``."""
    r = Path(root)
    cands = [r / "imagenet", r]
    for c in cands:
        if (c / "train").is_dir() and (c / "val").is_dir():
            return c / "train", c / "val"
    raise _not_found(
        "ImageNet (train/ and val/ with one folder per class)", [f"{c}/train + {c}/val" for c in cands],
        "download ILSVRC2012 from https://image-net.org, extract train/ and val/, and sort val/ into class "
        "folders (e.g. with the valprep.sh script of the PyTorch examples); then set data.root",
    )
