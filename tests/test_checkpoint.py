"""Atomic checkpoint writes and safe, clear loading."""
import os
import random

import numpy as np
import pytest
import torch

from letkd.engine.checkpoint import CheckpointError, load_file, rng_state, save_atomic, set_rng_state


def test_roundtrip_and_no_temp_left(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "cfg": {"a": [1, 2]}}
    p = tmp_path / "ck" / "last.pt"
    save_atomic(obj, p)
    back = load_file(p)
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], obj["model"]["w"])
    assert os.listdir(p.parent) == ["last.pt"]


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, p)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2, "big": torch.zeros(1000)}, p)
    monkeypatch.undo()
    assert load_file(p)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_truncated_file_clear_error(tmp_path):
    p = tmp_path / "last.pt"
    save_atomic({"w": torch.randn(100, 100)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as e:
        load_file(p)
    assert str(p) in str(e.value)


def test_garbage_and_missing(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(p)):
        load_file(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "missing.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "executed"
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, p)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(p)
    assert not marker.exists()


def test_rng_state_roundtrip(tmp_path):
    state = rng_state()
    save_atomic({"rng": state}, tmp_path / "r.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_file(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
