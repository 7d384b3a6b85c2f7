"""Atomic, code-free checkpoints.

A checkpoint is a dict of tensors and plain data. It is written to a temporary file in the
same directory, flushed and fsync'ed, then renamed over the target (``os.replace`` is atomic
on POSIX), and the directory entry is fsync'ed: a kill at any moment leaves either the previous
good file or the new complete one, never a truncated one. Files are read only with
``torch.load(weights_only=True)``, which cannot execute code; a file it refuses is diagnosed
from its bytes (:mod:`letkd.engine.torchfile`).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from letkd.engine.torchfile import DAMAGED, NOT_TORCH, diagnose

__all__ = ["save_atomic", "load_file", "unreadable_message", "CheckpointError", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint or artifact that cannot be read; the message names the file. ``kind`` is
    ``"missing"`` or a :func:`letkd.engine.torchfile.diagnose` verdict (``"not_torch"``,
    ``"damaged"``, ``"code"``)."""

    def __init__(self, message: str, kind: str = "missing") -> None:
        super().__init__(message)
        self.kind = kind


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically: temp file + fsync + rename + directory fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def load_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a file written by :func:`save_atomic` (or any torch.save file) safely.

    Raises :class:`CheckpointError` naming the file when it is missing, and, when torch refuses
    it, saying which of three things it is (:func:`letkd.engine.torchfile.diagnose`, which never
    unpickles): not a PyTorch file at all, a truncated or corrupted one, or a pickle that would
    run code. ``CheckpointError.kind`` is that verdict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader failure is diagnosed from the bytes
        kind, detail = diagnose(path, e)
    raise CheckpointError(unreadable_message(path, what, kind, detail), kind=kind)


def unreadable_message(path: Path, what: str, kind: str, detail: str) -> str:
    """The error text for each verdict of :func:`letkd.engine.torchfile.diagnose`."""
    if kind == NOT_TORCH:
        return (f"{what} file {path} is not a PyTorch file: {detail}. letkd reads files written by torch.save; "
                f"pass a run's checkpoints/best.pt or last.pt, or a file saved with "
                f"torch.save({{'model': model.state_dict()}}, path)")
    if kind == DAMAGED:
        return (f"{what} file {path} ({path.stat().st_size} bytes) is truncated or corrupted: "
                f"{detail}. It cannot be repaired; use another copy (for a run: checkpoints/best.pt, or re-run "
                f"without --resume), or copy or download it again")
    return (f"{what} file {path} holds pickled objects that would run code when loaded: {detail}. It was refused "
            f"by torch.load(weights_only=True) and nothing in it ran. If you trust where it came from, load it once "
            f"in Python with "
            f"torch.load(path, weights_only=False) and re-save only tensors and plain data, e.g. "
            f"torch.save({{'model': model.state_dict()}}, 'clean.pt')")


def rng_state() -> dict[str, Any]:
    """Every RNG state the training loop touches, as tensors and plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
