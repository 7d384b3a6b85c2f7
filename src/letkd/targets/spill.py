"""Every location's LDA features, kept on disk between the steps of Alg. 2 that need them.

Steps 3-5 of METHOD §3b (prototypes, decisions, ``S``) need the LDA feature of *every* location
twice, after the per-class K-means of step 2 — which itself needs a full pass to draw its sample.
Instead of running the teacher again for each step, the second teacher pass writes each batch's
projected rows ``z`` (n×d float32, d ≤ num_classes − 1) and labels to one temporary file, and the
later steps read them back batch by batch: the same tensors, in the same batches and order as the
teacher pass produced them, so the results are bit-identical to recomputing them.

Resident memory stays one batch (the file's pages are the operating system's cache, not the
process's), the disk holds ``N·H·W·(4·d + 4)`` bytes. The file lives in ``dir`` (default: the
system temporary folder, ``$TMPDIR``) and is deleted when the store is closed or collected.
"""
from __future__ import annotations

import tempfile
from typing import Iterator

import numpy as np
import torch

__all__ = ["FeatureSpill"]


class FeatureSpill:
    """Append ``(z, y)`` batches to a temporary file; :meth:`replay` reads them back in order.

    ``z``: n×``width`` rows (stored as float32, bit for bit); ``y``: n labels (stored as int32,
    read back as int64). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, width: int, dir: str | None = None) -> None:
        self.width = int(width)
        self._file = tempfile.TemporaryFile(prefix="letkd-fit-", suffix=".bin", dir=dir)
        self._sizes: list[int] = []
        self.rows = 0

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self.rows * (4 * self.width + 4)

    def write(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Append one batch: rows ``z`` (n×width) and their labels ``y`` (n)."""
        n = int(z.shape[0])
        if n == 0:   # adds nothing to any statistic
            return
        if z.dim() != 2 or z.shape[1] != self.width or y.shape != (n,):
            raise ValueError(f"FeatureSpill.write: rows must be n×{self.width} with n labels, got "
                             f"{tuple(z.shape)} and {tuple(y.shape)}")
        if z.dtype != torch.float32:
            raise TypeError(f"FeatureSpill.write: rows must be float32 (stored bit for bit), got {z.dtype}")
        self._file.write(memoryview(np.ascontiguousarray(z.detach().cpu().numpy())))
        self._file.write(memoryview(np.ascontiguousarray(y.detach().cpu().numpy().astype(np.int32))))
        self._sizes.append(n)
        self.rows += n

    def replay(self, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the written batches ``(z, y)`` in order, on ``device`` (``y`` as int64)."""
        self._file.flush()
        self._file.seek(0)
        for n in self._sizes:
            z = np.empty((n, self.width), dtype=np.float32)
            y = np.empty(n, dtype=np.int32)
            for buf in (z, y):
                if self._file.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                    raise RuntimeError("FeatureSpill: the temporary file is shorter than what was written")
            yield torch.from_numpy(z).to(device), torch.from_numpy(y).long().to(device)

    def close(self) -> None:
        """Delete the file."""
        self._file.close()

    def __enter__(self) -> "FeatureSpill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
