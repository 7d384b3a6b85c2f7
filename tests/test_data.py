"""Data pipeline: file formats, dataset layouts, augmentation vs per-image references, DDP split."""
from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, letkd_inproc
from letkd.config import DataConfig
from letkd.data import (DataFormatError, DatasetInfo, DatasetNotFoundError, InMemoryData, balanced_subset, build,
                        crop, crop_flip, draw_crop, draw_crop_flip, draw_rotate_flip, epoch_generator, read_cifar_pickle, read_idx,
                        restricted_pickle_load, rotate_flip)
from letkd.data.sources import FASHION_MNIST_SYSTEM_DIR, Split, load_cifar100, load_fashion_mnist


# ------------------------------------------------------------------------------- helpers
def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_cifar(root: Path, n_train: int = 200, n_test: int = 100) -> np.ndarray:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        out[split] = x
        obj = {b"filenames": [b"f%d.png" % i for i in range(n)], b"batch_label": b"x",
               b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)], b"data": x}
        (d / split).write_bytes(pickle.dumps(obj, protocol=2))
    meta = {b"fine_label_names": [b"c%d" % i for i in range(100)], b"coarse_label_names": [b"s%d" % i for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out["train"]


def write_tiny(root: Path, classes=("n01", "n02", "n03"), n_train: int = 4, n_val: int = 4) -> None:
    from PIL import Image
    d = root / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(reversed(classes)) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {w}, other\n" for w in classes))
    rng = np.random.default_rng(1)
    for w in classes:
        (d / "train" / w / "images").mkdir(parents=True)
        for i in range(n_train):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "train" / w / "images" / f"{w}_{i}.JPEG")
    lines, k = [], 0
    for i in range(n_val):
        for w in classes:
            name = f"val_{k}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            k += 1
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def write_folder(root: Path, classes, per: int, sizes=((40, 48), (20, 30))) -> None:
    from PIL import Image
    rng = np.random.default_rng(2)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def cat(batches, key):
    return torch.cat([b[key] for b in batches])


def small_data(n=50, test=23, C=3, H=8, augment="crop_flip", **kw):
    g = torch.Generator().manual_seed(0)
    tr = Split(torch.randint(0, 256, (n, C, H, H), generator=g, dtype=torch.uint8), torch.arange(n) % 5)
    te = Split(torch.randint(0, 256, (test, C, H, H), generator=g, dtype=torch.uint8), torch.arange(test) % 5)
    info = DatasetInfo("toy", 5, C, (H, H), (0.5,) * C, (0.25,) * C, n, test, [str(i) for i in range(5)])
    return InMemoryData(info, tr, te, augment=augment, test_batch_size=7, **kw)


# ---------------------------------------------------------------------------------- idx
@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", a, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "x", expect_ndim=3), a)


def test_idx_errors(tmp_path):
    a = np.zeros((5, 28, 28), np.uint8)
    write_idx(tmp_path / "x", a, False)
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "t").write_bytes(raw[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(tmp_path / "t")
    (tmp_path / "tg").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DataFormatError):
        read_idx(tmp_path / "tg")
    (tmp_path / "m").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(tmp_path / "m")
    with pytest.raises(DataFormatError, match="dimensions"):
        read_idx(tmp_path / "x", expect_ndim=1)


def test_fashion_mnist_layouts_and_missing(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, gz in (("train", 6, True), ("t10k", 3, False)):
        x = np.full((n, 28, 28), 7, np.uint8)
        write_idx(raw / (f"{split}-images-idx3-ubyte" + (".gz" if gz else "")), x, gz)
        write_idx(raw / (f"{split}-labels-idx1-ubyte" + (".gz" if gz else "")), np.arange(n) % 10, gz)
    tr, te = load_fashion_mnist(str(tmp_path), False, system_dir=str(tmp_path / "nosys"))
    assert tr.images.shape == (6, 1, 32, 32) and len(te) == 3
    assert tr.images[:, :, 2:30, 2:30].eq(7).all() and tr.images.sum() == 6 * 28 * 28 * 7
    with pytest.raises(DatasetNotFoundError) as e:
        load_fashion_mnist(str(tmp_path / "empty"), False, system_dir=str(tmp_path / "nosys"))
    msg = str(e.value)
    for place in (tmp_path / "empty" / "FashionMNIST" / "raw", tmp_path / "nosys"):
        assert str(place) in msg
    assert "dataset-fashion-mnist" in msg and "download" in msg


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path):
    d = build(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False), batch_size=1000, test_batch_size=1000)
    assert (d.info.num_train, d.info.num_test, d.info.in_channels, d.info.num_classes) == (60000, 10000, 1, 10)
    b = next(iter(d.test_batches()))
    assert b["images"].shape == (1000, 1, 32, 32) and b["labels"].dtype == torch.int64
    border = (0 - d.info.mean[0]) / d.info.std[0]
    assert torch.allclose(b["images"][:, :, :2], torch.tensor(border))
    x = next(iter(d.plain_train_batches(20000)))["images"]
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


# ------------------------------------------------------------------------------- CIFAR-100
def test_cifar100_folder_and_tar(tmp_path):
    x = write_cifar(tmp_path / "a")
    cfg = DataConfig(name="cifar100", root=str(tmp_path / "a"), download=False)
    d = build(cfg, batch_size=64, test_batch_size=100)
    assert (d.info.num_train, d.info.num_test, d.info.num_classes) == (200, 100, 100)
    assert d.info.class_names[:2] == ["c0", "c1"] and d.info.mean == (0.5071, 0.4867, 0.4408)
    assert d.steps_per_epoch == 4  # 200 / 64, last batch (8) kept
    p = next(iter(d.plain_train_batches(200)))
    img = torch.from_numpy(x.reshape(-1, 3, 32, 32)).float() / 255
    ref = (img - torch.tensor(d.info.mean).view(1, 3, 1, 1)) / torch.tensor(d.info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(p["images"], ref)
    assert p["labels"].tolist() == [i % 100 for i in range(200)] and p["index"].tolist() == list(range(200))

    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "a" / "cifar-100-python", arcname="cifar-100-python")
    d2 = build(DataConfig(name="cifar100", root=str(tmp_path / "b"), download=False), batch_size=64, test_batch_size=100)
    torch.testing.assert_close(next(iter(d2.plain_train_batches(200)))["images"], ref)

    (tmp_path / "c").mkdir()
    with tarfile.open(tmp_path / "c" / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "a" / "cifar-100-python" / "meta", arcname="cifar-100-python/../../evil")
    with pytest.raises(DataFormatError, match="outside"):
        build(DataConfig(name="cifar100", root=str(tmp_path / "c"), download=False), batch_size=64, test_batch_size=100)
    assert not (tmp_path / "evil").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    obj = restricted_pickle_load(pickle.dumps({b"data": arr, b"l": [1, 2]}, protocol=2))
    np.testing.assert_array_equal(obj[b"data"], arr)
    for proto in (2, 4):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            restricted_pickle_load(pickle.dumps({b"data": _Evil()}, protocol=proto))
    with pytest.raises(pickle.UnpicklingError):
        restricted_pickle_load(pickle.dumps(torch.nn.Linear, protocol=2))
    write_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        build(DataConfig(name="cifar100", root=str(tmp_path), download=False), batch_size=8, test_batch_size=8)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(DataFormatError):
        read_cifar_pickle(tmp_path / "cifar-100-python" / "train")


def test_missing_datasets_name_places(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build(DataConfig(name="cifar100", root=str(tmp_path), download=False), batch_size=8, test_batch_size=8)
    assert str(tmp_path / "cifar-100-python") in str(e.value) and "cifar-100-python.tar.gz" in str(e.value)
    assert "cs.toronto.edu" in str(e.value)
    with pytest.raises(DatasetNotFoundError) as e:
        build(DataConfig(name="tiny_imagenet", root=str(tmp_path)), batch_size=8, test_batch_size=8)
    assert str(tmp_path / "tiny-imagenet-200") in str(e.value) and "tiny-imagenet-200.zip" in str(e.value)
    with pytest.raises(DatasetNotFoundError) as e:
        build(DataConfig(name="imagenet", root=str(tmp_path)), batch_size=8, test_batch_size=8)
    assert str(tmp_path / "imagenet") in str(e.value)


@pytest.mark.parametrize("download", [True, False])
@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar100"])
def test_download_advice_matches_the_setting(tmp_path, monkeypatch, dataset, download):
    """No network here: torchvision's downloader is replaced by one that fails as it does offline."""
    import torchvision

    tried = []

    def offline(root, train=True, download=False, **kw):
        tried.append(download)
        raise ConnectionError("no route to host (offline)")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DatasetNotFoundError) as e:
        if dataset == "fashion_mnist":
            load_fashion_mnist(str(tmp_path), download, system_dir=str(tmp_path / "nosys"))
        else:
            load_cifar100(str(tmp_path), download)
    msg = str(e.value)
    if download:
        assert tried and all(tried)
        assert "Tried (data.download=true)" in msg and "ConnectionError: no route to host" in msg
        assert "data.download is already true" in msg and "set data.download=true" not in msg
    else:
        assert not tried
        assert "data.download=false, so no download was tried" in msg and "set data.download=true" in msg
        assert "Tried" not in msg
    assert ("cs.toronto.edu" if dataset == "cifar100" else "dataset-fashion-mnist") in msg


# ----------------------------------------------------------------------------- Tiny-ImageNet
def test_tiny_imagenet_folder_cache_and_zip(tmp_path):
    from PIL import Image
    write_tiny(tmp_path / "a")
    cfg = DataConfig(name="tiny_imagenet", root=str(tmp_path / "a"))
    d = build(cfg, batch_size=4, test_batch_size=5)
    i = d.info
    assert (i.num_train, i.num_val, i.num_test, i.num_classes, i.image_size) == (12, 6, 6, 3, (64, 64))
    assert i.class_names == ["thing n01", "thing n02", "thing n03"]  # sorted wnids
    # per class, val files sorted by name: first half -> val, rest -> test (class n01: val_0, val_3 | val_6, val_9)
    test = list(d.test_batches())
    assert cat(test, "labels").tolist() == [0, 0, 1, 1, 2, 2]
    with Image.open(tmp_path / "a" / "tiny-imagenet-200" / "val" / "images" / "val_6.JPEG") as im:
        want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    got = test[0]["images"][0] * torch.tensor(i.std).view(3, 1, 1) + torch.tensor(i.mean).view(3, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cat(list(d.val_batches()), "labels").tolist() == [0, 0, 1, 1, 2, 2]
    assert next(iter(d.train_batches(0)))["images"].shape == (4, 3, 64, 64)
    cache = tmp_path / "a" / "tiny-imagenet-200" / "letkd-uint8-cache-v1.pt"
    assert cache.is_file()
    d2 = build(cfg, batch_size=4, test_batch_size=5)  # from the cache
    torch.testing.assert_close(cat(list(d2.test_batches()), "images"), cat(test, "images"))

    (tmp_path / "b").mkdir()
    src = tmp_path / "a"
    with zipfile.ZipFile(tmp_path / "b" / "tiny-imagenet-200.zip", "w") as zf:
        for p in sorted((src / "tiny-imagenet-200").rglob("*")):
            if p.is_file() and p != cache:
                zf.write(p, p.relative_to(src).as_posix())
    d3 = build(DataConfig(name="tiny_imagenet", root=str(tmp_path / "b")), batch_size=4, test_batch_size=5)
    torch.testing.assert_close(cat(list(d3.test_batches()), "images"), cat(test, "images"))


# ------------------------------------------------------------------------- ImageFolder-style
def test_imagenet_folder_streaming(tmp_path):
    write_folder(tmp_path / "imagenet" / "train", ["a", "b"], 3)
    write_folder(tmp_path / "imagenet" / "val", ["a", "b"], 2)
    cfg = DataConfig(name="imagenet", root=str(tmp_path), image_size=16, num_workers=0)
    one = build(cfg, batch_size=4, test_batch_size=3, seed=3)
    assert (one.info.num_train, one.info.num_test, one.info.class_names) == (6, 4, ["a", "b"])
    assert one.steps_per_epoch == 2
    tb = list(one.train_batches(1))
    assert tb[0]["images"].shape == (4, 3, 16, 16) and tb[0]["images"].dtype == torch.float32
    assert sorted(cat(tb, "index").tolist()) == list(range(6))
    te = list(one.test_batches())
    assert cat(te, "labels").tolist() == [0, 0, 1, 1]
    ranks = [build(cfg, batch_size=4, test_batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for key in ("images", "labels", "index"):
        for step, b in enumerate(tb):
            parts = [list(r.train_batches(1))[step][key] for r in ranks]
            torch.testing.assert_close(torch.cat(parts), b[key], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([cat(list(r.test_batches()), key) for r in ranks]), cat(te, key))
    assert not torch.equal(cat(list(one.train_batches(2)), "index"), cat(tb, "index")) or \
        not torch.equal(cat(list(one.train_batches(2)), "images"), cat(tb, "images"))


def test_image_folder_in_memory(tmp_path):
    write_folder(tmp_path / "tr", ["cat", "dog", "eel"], 4)
    write_folder(tmp_path / "te", ["cat", "dog", "eel"], 2)
    cfg = DataConfig(name="image_folder", train_dir=str(tmp_path / "tr"), test_dir=str(tmp_path / "te"), image_size=24)
    d = build(cfg, batch_size=6, test_batch_size=4)
    assert isinstance(d, InMemoryData)
    assert (d.info.num_train, d.info.num_test, d.info.class_names, d.info.image_size) == (12, 6, ["cat", "dog", "eel"], (24, 24))
    x = cat(list(d.plain_train_batches(5)), "images")
    assert x.shape == (12, 3, 24, 24) and abs(float(x.mean())) < 1e-3  # mean/std computed from the data
    write_folder(tmp_path / "bad", ["cat", "fox"], 1)
    with pytest.raises(DataFormatError, match="fox"):
        build(DataConfig(name="image_folder", train_dir=str(tmp_path / "tr"), test_dir=str(tmp_path / "bad")),
              batch_size=6, test_batch_size=4)
    with pytest.raises(ValueError, match="train_dir"):
        build(DataConfig(name="image_folder"), batch_size=6, test_batch_size=4)


def test_distill_on_an_image_folder_with_crop(tmp_path):
    """`letkd distill ... data.augment=crop` on a folder of grey, left-right asymmetric images."""
    from PIL import Image

    from letkd import models

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for k, c in enumerate(("one", "four", "seven")):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
                img[4:28, 6 + 6 * k:10 + 6 * k] = 220  # a bar whose position names the class: mirroring moves it
                Image.fromarray(img, mode="L").save(tmp_path / split / c / f"{i}.png")
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)  # random weights stand in for a trained teacher
    torch.save({"model": models.create("resnet8", num_classes=3, in_channels=1).state_dict()}, teacher)
    run = tmp_path / "run"
    letkd_inproc("distill", ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8" / "kd.yaml",
                 "data.name=image_folder", f"data.train_dir={tmp_path / 'train'}", f"data.test_dir={tmp_path / 'test'}",
                 "data.augment=crop", "data.image_size=32", "teacher.name=resnet8", f"teacher.checkpoint={teacher}",
                 "train.epochs=1", "train.batch_size=6", "train.test_batch_size=6", "train.precision=fp32",
                 "train.channels_last=false", "train.progress=false", "run.tensorboard=false", f"run.dir={run}")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["augment"] == "crop"
    s = json.loads((run / "summary.json").read_text())
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert s["dataset"] == "image_folder" and s["epochs"] == 1 and row["train_images"] == 18
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss"))


# ------------------------------------------------------------------------------------ subsets
def test_subset_balanced_and_deterministic(tmp_path):
    labels = torch.arange(200) % 10
    a = balanced_subset(labels, 23, 10, seed=1)
    assert torch.bincount(labels[a], minlength=10).tolist() == [3, 3, 3] + [2] * 7
    assert torch.equal(a, balanced_subset(labels, 23, 10, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 23, 10, seed=2))
    with pytest.raises(ValueError, match="only 200"):
        balanced_subset(labels, 201, 10, seed=1)
    with pytest.raises(ValueError, match="class"):
        balanced_subset(torch.tensor([0] * 10 + [1]), 6, 2, seed=0)
    write_cifar(tmp_path)
    cfg = DataConfig(name="cifar100", root=str(tmp_path), download=False, train_subset=150, test_subset=100, subset_seed=4)
    d = build(cfg, batch_size=50, test_batch_size=100)
    assert (d.info.num_train, d.info.num_test) == (150, 100)
    lab = cat(list(d.plain_train_batches(150)), "labels")
    assert torch.bincount(lab, minlength=100).tolist() == [2] * 50 + [1] * 50
    with pytest.raises(ValueError, match="only 200"):
        build(DataConfig(name="cifar100", root=str(tmp_path), download=False, train_subset=300), batch_size=8, test_batch_size=8)


# ------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_flip_matches_per_image_reference(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 10, 12), generator=g, dtype=torch.uint8)
    offsets, flips = draw_crop_flip(g, 16, 4)
    assert offsets.min() >= 0 and offsets.max() <= 8 and flips.any() and (~flips).any()
    out = crop_flip(x, 4, offsets, flips, mode=mode)
    for i in range(16):
        p = F.pad(x[i:i + 1].float(), [4] * 4, mode="reflect" if mode == "reflect" else "constant")[0]
        t, l = offsets[i].tolist()
        ref = p[:, t:t + 10, l:l + 12]
        ref = ref.flip(-1) if flips[i] else ref
        assert torch.equal(out[i].float(), ref), i
    idx = torch.tensor([3, 0, 7])  # gather straight from the dataset
    assert torch.equal(crop_flip(x, 4, offsets[:3], flips[:3], mode=mode, index=idx),
                       crop_flip(x[idx], 4, offsets[:3], flips[:3], mode=mode))


def _pad_crops(x: torch.Tensor, pad: int, mode: str) -> list[torch.Tensor]:
    """Every pad-and-crop of one C×H×W image (no flip), computed directly with F.pad."""
    _, H, W = x.shape
    p = F.pad(x[None].float(), [pad] * 4, mode="reflect" if mode == "reflect" else "constant")[0]
    return [p[:, t:t + H, l:l + W] for t in range(2 * pad + 1) for l in range(2 * pad + 1)]


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_matches_reference_and_never_flips(mode):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (8, 3, 10, 12), generator=g, dtype=torch.uint8)
    offsets = draw_crop(g, 8, 4)
    assert offsets.shape == (8, 2) and offsets.min() >= 0 and offsets.max() <= 8
    out = crop(x, 4, offsets, mode=mode)
    for i in range(8):
        t, l = offsets[i].tolist()
        assert torch.equal(out[i].float(), _pad_crops(x[i], 4, mode)[t * 9 + l]), i
    # a left-right asymmetric image (brightness rising left to right) through the whole loader:
    # over many draws every crop is an unmirrored pad-and-crop of it, never a mirrored one
    ramp = (torch.arange(8) * 30 + 10).to(torch.uint8).expand(1, 8, 8)
    imgs = ramp.expand(20, 1, 8, 8).clone()
    plain = _pad_crops(ramp, 1, "zeros")
    mirrored = [c.flip(-1) for c in plain]
    assert not any(torch.equal(m, c) for m in mirrored for c in plain)  # so a flip would be caught
    seen = {}
    for augment in ("crop", "crop_flip"):
        info = DatasetInfo("ramp", 1, 1, (8, 8), (0.0,), (1.0,), 20, 4, ["a"])
        zeros = torch.zeros(20, dtype=torch.long)
        d = InMemoryData(info, Split(imgs, zeros), Split(imgs[:4], zeros[:4]), augment=augment, pad_mode="zeros",
                         batch_size=10)
        assert d.pad == 1
        got = [b["images"][i] * 255 for e in range(10) for b in d.train_batches(e) for i in range(len(b["images"]))]
        assert len(got) == 200
        seen[augment] = [any(torch.allclose(y, m, atol=1e-3) for m in mirrored) for y in got]
        assert all(any(torch.allclose(y, c, atol=1e-3) for c in plain + mirrored) for y in got)
    assert not any(seen["crop"])  # crop: 200 draws, none mirrored
    assert 50 < sum(seen["crop_flip"]) < 150  # crop_flip mirrors about half: the check sees flips


def test_streaming_crop_never_flips():
    from PIL import Image

    from letkd.data import make_transforms
    ramp = Image.fromarray((np.arange(16, dtype=np.uint8) * 15 + 5)[None].repeat(16, 0), mode="L")
    train, _ = make_transforms("crop", 16, None, squash=True)
    torch.manual_seed(0)
    for _ in range(50):
        y = train(ramp)[0].float()
        inner = y[:, 2:-2]  # away from the reflected border, brightness still rises left to right
        assert (inner[:, 1:] > inner[:, :-1]).all()


def test_rotate_flip_matches_torchvision():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 3, 16, 20), generator=g, dtype=torch.uint8)
    angles, flips = draw_rotate_flip(g, 8, 20.0)
    assert angles.abs().max() <= 20 and flips.any() and (~flips).any()
    out = rotate_flip(x, angles, flips)
    for i in range(8):
        ref = TF.rotate(x[i].float(), float(angles[i]), interpolation=InterpolationMode.BILINEAR)
        ref = TF.hflip(ref) if flips[i] else ref
        assert (out[i] - ref).abs().max() < 0.01, i


def test_train_batches_follow_the_documented_rule():
    d = small_data(augment="crop_flip", batch_size=8, seed=5)
    g = epoch_generator(5, 3)
    perm = torch.randperm(50, generator=g)
    offsets, flips = draw_crop_flip(g, 8, d.pad)
    data = d._splits["train"][0]
    ref = crop_flip(data[perm[:8]], d.pad, offsets, flips)
    b = next(iter(d.train_batches(3)))
    assert torch.equal(b["index"], perm[:8])
    torch.testing.assert_close(b["images"], (ref.float() / 255 - 0.5) / 0.25)


# ------------------------------------------------------------------------------ DDP sharding
@pytest.mark.parametrize("augment", ["crop_flip", "rotate_flip", "imagenet", "none"])
def test_ddp_split_equals_single_process(augment):
    one = small_data(augment=augment, batch_size=8, seed=7)
    ranks = [small_data(augment=augment, batch_size=8, seed=7, rank=r, world_size=2) for r in range(2)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 7  # 50 = 6*8 + 2, last kept
    single = list(one.train_batches(4))
    per_rank = [list(r.train_batches(4)) for r in ranks]
    assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 7
    for step, b in enumerate(single):
        for key in ("images", "labels", "index"):
            torch.testing.assert_close(torch.cat([per_rank[0][step][key], per_rank[1][step][key]]), b[key], rtol=0, atol=0)
    assert sorted(cat(single, "index").tolist()) == list(range(50))
    again = list(one.train_batches(4))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(single, again))
    other = list(one.train_batches(5))
    assert not torch.equal(cat(other, "index"), cat(single, "index"))
    for get in (lambda d: d.test_batches(), lambda d: d.plain_train_batches(6)):
        whole = list(get(one))
        parts = [list(get(r)) for r in ranks]
        for key in ("images", "labels", "index"):
            ref = cat(whole, key)
            got = torch.cat([torch.cat([p[i][key] for p in parts if i < len(p)]) for i in range(len(whole))])
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert cat(list(one.test_batches()), "index").tolist() == list(range(23))


def test_ddp_edge_cases():
    with pytest.raises(ValueError, match="divisible"):
        small_data(batch_size=9, world_size=2)
    d = small_data(n=49, batch_size=8, world_size=2, rank=1)  # last global batch has 1 sample < 2 ranks: dropped
    assert d.steps_per_epoch == 6 and len(list(d.train_batches(0))) == 6
    d = small_data(batch_size=8, channels_last=True)
    assert next(iter(d.train_batches(0)))["images"].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="validation"):
        d.val_batches()
