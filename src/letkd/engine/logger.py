"""Per-epoch metrics: ``metrics.jsonl`` (one JSON object per epoch) and TensorBoard events."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "read_metrics", "write_json_atomic"]


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON through a temp file + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLogger:
    """Appends epoch rows to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume from epoch ``e``, rows after ``e`` (from the part of the run that was lost) are
    dropped so the file matches an uninterrupted run; TensorBoard is told to purge them too.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_epoch: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        rows = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= resume_epoch] if resume_epoch else []
        with open(self.path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None)
            except ImportError:  # tensorboard is a dependency; tolerate a broken install
                self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            step = int(row["epoch"])
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
