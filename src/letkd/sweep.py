"""``letkd sweep``: methods × pairs × seeds from one file, resumable, with a results table.

A sweep file is plain YAML::

    out: runs/sweeps/fmnist                # every run lives under here
    seeds: [0, 1, 2]
    overrides: [train.epochs=3]            # applied to every run (before each run's own)
    pre:                                   # run once before the others (e.g. teachers), seed as given
      - {label: teacher_resnet20, config: configs/fashion_mnist/resnet20.yaml}
    runs:
      - {label: vanilla, config: configs/fashion_mnist/resnet20_resnet8/vanilla.yaml}
      - {label: letkd2-a0, config: configs/.../letkd2.yaml, overrides: [method.alpha_inter=0]}

Config paths are relative to the sweep file; ``out`` (like ``--out``) is relative to the working
directory, so run sweeps from the repository root. Run directories are ``<out>/<label>/seed<seed>`` (``<out>/<label>`` for ``pre``). A run whose
``summary.json`` exists is skipped; one with ``checkpoints/last.pt`` is resumed; so a sweep
killed anywhere continues where it stopped. Several sweep processes may share one sweep (e.g.
one per core with ``OMP_NUM_THREADS=1 taskset -c N``, or one per GPU): each run is claimed with a
lock file (:func:`claim`), and a run claimed by a live process is skipped by the others. ``{pre:LABEL}`` in an override is replaced by that
pre-run's best checkpoint path. The table (``results.md`` / ``results.csv``) gives, per label,
mean ± std over seeds of best-epoch and last-epoch test accuracy, the seed count, and links to
each run's config and metrics.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from letkd.config import ConfigError

__all__ = ["SweepRun", "load_sweep", "run_sweep", "tabulate", "claim", "release", "collect", "write_tables"]


@dataclass
class SweepRun:
    label: str
    config: str
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None
    run_dir: Path = Path()


def _runs_from(entries: Any, key: str, base_dir: Path) -> list[dict]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"sweep: '{key}' must be a list of {{label, config, overrides}} entries")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "config" not in e or "label" not in e:
            raise ConfigError(f"sweep: {key}[{i}] needs 'label' and 'config' (got {e!r})")
        unknown = set(e) - {"label", "config", "overrides"}
        if unknown:
            raise ConfigError(f"sweep: {key}[{i}] has unknown keys {sorted(unknown)}; valid: label, config, overrides")
        cfg = Path(e["config"])
        out.append({"label": str(e["label"]), "config": str(cfg if cfg.is_absolute() else base_dir / cfg),
                    "overrides": [str(o) for o in e.get("overrides", []) or []]})
    return out


def load_sweep(path: str | Path, out: str | None = None) -> tuple[Path, list[SweepRun], list[SweepRun]]:
    """Parse a sweep file into (output folder, pre-runs, runs)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read sweep file {path}: {e}") from None
    unknown = set(spec) - {"out", "seeds", "overrides", "pre", "runs"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {sorted(unknown)}; valid: out, seeds, overrides, pre, runs")
    root = Path(out or spec.get("out") or Path("runs") / "sweeps" / path.stem)
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"sweep file {path}: seeds must be a list of integers")
    common = [str(o) for o in spec.get("overrides", []) or []]
    pre = [SweepRun(e["label"], e["config"], common + e["overrides"], None, root / e["label"])
           for e in _runs_from(spec.get("pre"), "pre", path.parent)]
    # seed-major order: a sweep stopped part-way has comparable rows for every label
    entries = _runs_from(spec.get("runs"), "runs", path.parent)
    runs = [SweepRun(e["label"], e["config"], common + e["overrides"], s, root / e["label"] / f"seed{s}")
            for s in seeds for e in entries]
    labels = [r.label for r in pre] + sorted({r.label for r in runs})
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sweep file {path}: labels must be unique")
    return root, pre, runs


def _overrides(r: SweepRun, pre: dict[str, Path]) -> list[str]:
    out = []
    for o in r.overrides:
        for label, ckpt in pre.items():
            o = o.replace("{pre:" + label + "}", str(ckpt))
        out.append(o)
    if r.seed is not None:
        out.append(f"train.seed={r.seed}")
    out.append(f"run.dir={r.run_dir}")
    return out


def run_sweep(path: str | Path, out: str | None = None, only: list[str] | None = None,
              dry_run: bool = False, log=print) -> Path:
    """Run what is missing of a sweep (skipping finished runs), then write its tables."""
    from letkd import config
    from letkd.engine import dist
    from letkd.engine.trainer import run

    root, pre, runs = load_sweep(path, out)
    pre_ckpt = {r.label: r.run_dir / "checkpoints" / "best.pt" for r in pre}
    todo = [r for r in [*pre, *runs] if not only or r.label in only]
    for i, r in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {r.label}" + (f" seed {r.seed}" if r.seed is not None else "")
        if (r.run_dir / "summary.json").exists():
            log(f"{tag}: done, skipped")
            continue
        if dry_run:
            log(f"{tag}: would run {r.config} {' '.join(_overrides(r, pre_ckpt))}")
            continue
        cfg = config.load(r.config, _overrides(r, pre_ckpt))
        holder = claim(r.run_dir)
        if holder is not None:
            log(f"{tag}: being run by another sweep process ({holder}), skipped")
            continue
        log(f"{tag}: running -> {r.run_dir}")
        try:
            run(cfg, resume=True)
        finally:
            release(r.run_dir)
    if dist.is_main() and not dry_run:
        write_tables(root, collect(root, [*pre, *runs]))
    return root


def tabulate(path: str | Path, out: str | None = None) -> Path:
    """Write the tables from the runs finished so far and run nothing (``letkd sweep --tables``):
    for a sweep stopped part-way, or split over processes that have not all finished."""
    root, pre, runs = load_sweep(path, out)
    write_tables(root, collect(root, [*pre, *runs]))
    return root


LOCK = ".sweep.lock"


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run_dir: Path) -> str | None:
    """Take ``run_dir/.sweep.lock`` for this process, so that several ``letkd sweep`` processes
    (on separate cores, GPUs or machines sharing the folder) can work through one sweep without
    two of them training the same run. Returns None when claimed, else the holder ("host pid").
    A lock left by a process that no longer exists on this host is taken over; one from another
    host is respected (delete the file if no process runs it). Under ``torchrun`` every rank runs
    the same run, so no lock is taken."""
    if _distributed():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, me = run_dir / LOCK, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text().strip()
            except FileNotFoundError:
                continue                                   # released meanwhile: try again
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)               # stale: its process is gone
                continue
            return holder
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return None
    return lock.read_text().strip() if lock.exists() else "another process"


def release(run_dir: Path) -> None:
    """Remove this process's lock from ``run_dir`` (leaves another process's alone)."""
    lock = run_dir / LOCK
    try:
        if lock.read_text().strip() == f"{socket.gethostname()} {os.getpid()}":
            lock.unlink()
    except FileNotFoundError:
        pass


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None, None for none)."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(root: Path, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per label: mean ± std of best/last accuracy over the finished seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for r in runs:
        s_path = r.run_dir / "summary.json"
        row = rows.setdefault(r.label, {"label": r.label, "best": [], "last": [], "wall": [], "runs": [],
                                        "summary": None, "pending": 0})
        if not s_path.exists():
            row["pending"] += 1
            continue
        s = json.loads(s_path.read_text())
        row["best"].append(s["best_acc"])
        row["last"].append(s["last_acc"])
        if s.get("wall_seconds") is not None:
            row["wall"].append(s["wall_seconds"])
        row["runs"].append(r.run_dir)
        row["summary"] = s
    out = []
    for row in rows.values():
        s = row["summary"] or {}
        bm, bs = mean_std(row["best"])
        lm, ls = mean_std(row["last"])
        out.append({"label": row["label"], "method": s.get("method"), "teacher": s.get("teacher"),
                    "student": s.get("student"), "seeds": len(row["best"]), "pending": row["pending"],
                    "best_mean": bm, "best_std": bs, "last_mean": lm, "last_std": ls,
                    "best_all": row["best"], "last_all": row["last"],
                    "params_student": s.get("params_student"), "params_extra": s.get("params_extra"),
                    "images_per_second": s.get("images_per_second"), "epochs": s.get("epochs"),
                    "wall_seconds_mean": mean_std(row["wall"])[0],
                    "runs": [str(p) for p in row["runs"]]})
    return out


def _fmt(m: float | None, s: float | None) -> str:
    return "–" if m is None else f"{m:.2f} ± {s:.2f}"


def write_tables(root: Path, rows: list[dict[str, Any]]) -> None:
    """results.md and results.csv in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "method", "teacher", "student", "seeds", "best_mean", "best_std", "last_mean",
                    "last_std", "best_all", "last_all", "params_student", "params_extra", "images_per_second",
                    "epochs", "wall_seconds_mean"])
        for r in rows:
            w.writerow([r["label"], r["method"], r["teacher"], r["student"], r["seeds"], r["best_mean"], r["best_std"],
                        r["last_mean"], r["last_std"], " ".join(map(str, r["best_all"])),
                        " ".join(map(str, r["last_all"])), r["params_student"], r["params_extra"],
                        r["images_per_second"], r["epochs"], r["wall_seconds_mean"]])
    lines = ["| run | method | teacher → student | seeds | best-epoch acc (%) | last-epoch acc (%) | extra params | img/s | wall / run | logs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        links = " ".join(f"[{Path(p).name}]({Path(p).relative_to(root).as_posix()}/metrics.jsonl)"
                         for p in r["runs"] if Path(p).is_relative_to(root))
        ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "–"
        pend = f" (+{r['pending']} pending)" if r["pending"] else ""
        wall = f"{r['wall_seconds_mean'] / 60:.1f} min" if r.get("wall_seconds_mean") else "–"
        lines.append(f"| {r['label']} | {r['method'] or '–'} | {r['teacher'] or '–'} → {r['student'] or '–'} | {r['seeds']}{pend} | "
                     f"{_fmt(r['best_mean'], r['best_std'])} | {_fmt(r['last_mean'], r['last_std'])} | "
                     f"{r['params_extra'] if r['params_extra'] is not None else '–'} | {ips} | {wall} | {links} |")
    (root / "results.md").write_text("\n".join(lines) + "\n\nmean ± sample std over seeds; best = best test "
                                     "accuracy over epochs, last = accuracy after the final epoch; wall = mean wall time of one run.\n")
