"""Atomic checkpoint writes and safe, clear loading."""
import os
import random
import re

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


# A damaged checkpoint is told apart from a file that is no checkpoint and from one that would
# run code (issue 15): each case has its own message and advice, none unpickles anything.
def _refusal(p):
    with pytest.raises(CheckpointError) as e:
        load_file(p)
    return e.value.kind, str(e.value)


def test_truncated_file_is_called_damaged(tmp_path):
    p = tmp_path / "last.pt"
    save_atomic({"w": torch.randn(100, 100)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    kind, msg = _refusal(p)
    assert kind == "damaged" and str(p) in msg and f"({len(data) // 2} bytes) is truncated or corrupted" in msg
    assert "another copy" in msg and "not a PyTorch file" not in msg and "run code" not in msg


def test_corrupted_pickle_and_empty_file_are_damaged(tmp_path):
    p = tmp_path / "c.pt"
    save_atomic({"epoch": 3, "w": torch.randn(10)}, p)
    data = bytearray(p.read_bytes())
    i = data.index(b"data.pkl") + len(b"data.pkl") + 30  # inside the pickle bytes of the first member
    data[i:i + 8] = b"\xff" * 8
    p.write_bytes(bytes(data))
    kind, msg = _refusal(p)
    assert kind == "damaged" and "truncated or corrupted" in msg and "CRC" in msg
    (tmp_path / "e.pt").write_bytes(b"")
    kind, msg = _refusal(tmp_path / "e.pt")
    assert kind == "damaged" and "empty (0 bytes)" in msg


def test_text_file_is_not_a_pytorch_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("these are my notes, renamed .pt by mistake\n")
    kind, msg = _refusal(p)
    assert kind == "not_torch" and f"{p} is not a PyTorch file" in msg and "'these are my notes" in msg
    assert "torch.save" in msg and "corrupted" not in msg and "run code" not in msg
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_file(tmp_path / "missing.pt")
    assert e.value.kind == "missing"


def test_other_formats_are_not_pytorch_files(tmp_path):
    import pickle
    import zipfile

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    (tmp_path / "g.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    for name, says in (("plain.pkl", "plain Python pickle"), ("a.zip", "zip archive without data.pkl"),
                       ("g.gz", "gzip")):
        kind, msg = _refusal(tmp_path / name)
        assert kind == "not_torch" and says in msg, (name, msg)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_pickle_that_would_run_code_is_refused_unrun(tmp_path, fmt):
    import pickle

    marker = tmp_path / "executed"
    p = tmp_path / "evil.pt"
    if fmt == "plain_pickle":
        p.write_bytes(pickle.dumps({"model": _Evil(str(marker))}, protocol=4))  # STACK_GLOBAL, not GLOBAL
    else:
        torch.save({"model": _Evil(str(marker))}, p, _use_new_zipfile_serialization=fmt == "zip")
    kind, msg = _refusal(p)
    assert kind == "code" and "would run code" in msg and re.search(r"calls [\w.]*\.open\b", msg), msg
    assert "nothing in it ran" in msg and "corrupted" not in msg and "not a PyTorch file" not in msg
    assert not marker.exists()


def test_rng_state_roundtrip(tmp_path):
    state = rng_state()
    save_atomic({"rng": state}, tmp_path / "r.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_file(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_letkd_evaluate_names_each_case(tmp_path):
    """What the user of `letkd evaluate` reads for each kind of bad file (exit code 2, no traceback)."""
    from conftest import letkd_inproc

    good = tmp_path / "good.pt"
    save_atomic({"model": {"w": torch.randn(50, 50)}}, good)
    (tmp_path / "notes.pt").write_text("not a checkpoint, a text file renamed .pt\n")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:300])
    torch.save({"model": _Evil(str(tmp_path / "executed"))}, tmp_path / "evil.pt")
    for name, says in (("notes.pt", "is not a PyTorch file"), ("cut.pt", "is truncated or corrupted"),
                       ("evil.pt", "would run code")):
        rc, _, err = letkd_inproc("evaluate", tmp_path / name, check=False)
        assert rc == 2 and err.startswith("letkd: error: checkpoint file") and says in err, (name, err)
    assert not (tmp_path / "executed").exists()
