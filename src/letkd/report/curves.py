"""Training curves and the method comparison chart (matplotlib, Agg backend, PNG files).

* :func:`plot_accuracy` / :func:`plot_losses`: one run's ``metrics.jsonl`` (train / test accuracy
  vs epoch; every ``loss_*`` term in its own panel, plus the total ``loss``).
* :func:`plot_sweep_curves`: test accuracy of every run of a sweep on one plot, coloured by label.
* :func:`plot_comparison`: per label, mean ± std over seeds of best-epoch and last-epoch accuracy
  (from each run's ``summary.json``), a bar chart with error bars.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from letkd.sweep import mean_std  # noqa: E402

__all__ = ["read_metrics", "read_summary", "loss_keys", "plot_accuracy", "plot_losses", "plot_sweep_curves",
           "plot_comparison", "label_stats"]


class ReportError(ValueError):
    """A run or sweep directory lacks what a plot needs (the message says what)."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (a torn last line is ignored); [] when absent."""
    from letkd.engine.logger import read_metrics as _read

    return _read(Path(run_dir) / "metrics.jsonl")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def loss_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``loss`` (the total) first, then every ``loss_*`` key in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if (k == "loss" or k.startswith("loss_")) and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "loss", keys.index(k)))


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows, 1):
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r.get("epoch", i))
            ys.append(float(v))
    return xs, ys


def _save(fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train and test accuracy (%) vs epoch."""
    xs_tr, ys_tr = _series(rows, "train_acc")
    xs_te, ys_te = _series(rows, "test_acc")
    if not ys_tr and not ys_te:
        raise ReportError("metrics.jsonl has no train_acc / test_acc values")
    fig, ax = plt.subplots(figsize=(6, 4))
    if ys_tr:
        ax.plot(xs_tr, ys_tr, "o-", label="train", ms=3)
    if ys_te:
        ax.plot(xs_te, ys_te, "s-", label="test", ms=3)
        b = max(range(len(ys_te)), key=ys_te.__getitem__)
        ax.annotate(f"best {ys_te[b]:.2f} (ep {xs_te[b]})", (xs_te[b], ys_te[b]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_losses(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Every loss term (``loss`` and each ``loss_*``) vs epoch, one panel per term."""
    keys = loss_keys(rows)
    if not keys:
        raise ReportError("metrics.jsonl has no loss / loss_* values")
    n = len(keys)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        xs, ys = _series(rows, k)
        ax.plot(xs, ys, "o-", ms=3, color="C3" if k == "loss" else "C0")
        ax.set_title("total loss" if k == "loss" else k, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or "training losses (per-epoch mean)")
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep_curves(runs: Sequence[tuple[str, str, Sequence[dict[str, Any]]]], path: Path,
                      key: str = "test_acc", title: str = "") -> Path:
    """``runs``: (label, run name, metric rows). One line per run, one colour per label."""
    labels = list(dict.fromkeys(lab for lab, _, _ in runs))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen: set[str] = set()
    for lab, name, rows in runs:
        xs, ys = _series(rows, key)
        if not ys:
            continue
        c = cmap(labels.index(lab) % cmap.N)
        ax.plot(xs, ys, "-", marker="o", ms=2, lw=1.2, color=c, alpha=0.85, label=None if lab in seen else lab)
        seen.add(lab)
    if not seen:
        plt.close(fig)
        raise ReportError(f"no run has {key} values in its metrics.jsonl")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)" if key == "test_acc" else key)
    ax.set_title(title or "test accuracy of every run (one colour per label)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(seen) > 8 else 1)
    return _save(fig, path)


def label_stats(summaries: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per label (first-seen order): n, best/last mean and sample std over its runs' summaries."""
    groups: dict[str, dict[str, list[float]]] = {}
    for lab, s in summaries:
        g = groups.setdefault(lab, {"best": [], "last": []})
        for k in ("best", "last"):
            v = s.get(f"{k}_acc")
            if isinstance(v, (int, float)):
                g[k].append(float(v))
    out = []
    for lab, g in groups.items():
        if not g["best"] and not g["last"]:
            continue
        row: dict[str, Any] = {"label": lab, "n": max(len(g["best"]), len(g["last"]))}
        for k in ("best", "last"):
            m, s = mean_std(g[k]) if g[k] else (float("nan"), 0.0)
            row[f"{k}_mean"], row[f"{k}_std"] = m, s
        out.append(row)
    return out


def plot_comparison(stats: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Bar chart: best-epoch and last-epoch accuracy per label, mean ± std over seeds."""
    if not stats:
        raise ReportError("no finished run (summary.json with best_acc / last_acc) to compare")
    import numpy as np

    x = np.arange(len(stats))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(stats) + 2), 4.5))
    for off, k, c in ((-w / 2, "best", "C0"), (w / 2, "last", "C1")):
        m = [r[f"{k}_mean"] for r in stats]
        s = [r[f"{k}_std"] for r in stats]
        bars = ax.bar(x + off, m, w, yerr=s, capsize=3, color=c, label=f"{k} epoch", alpha=0.9)
        for b, mv, sv in zip(bars, m, s):
            if mv == mv:  # not NaN
                ax.text(b.get_x() + b.get_width() / 2, mv + sv, f"{mv:.1f}", ha="center", va="bottom", fontsize=7)
    vals = [r[f"{k}_mean"] - r[f"{k}_std"] for r in stats for k in ("best", "last") if r[f"{k}_mean"] == r[f"{k}_mean"]]
    tops = [r[f"{k}_mean"] + r[f"{k}_std"] for r in stats for k in ("best", "last") if r[f"{k}_mean"] == r[f"{k}_mean"]]
    if vals:
        lo, hi = min(vals), max(tops)
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad > lo else hi + 1)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['label']}\n(n={r['n']})" for r in stats], rotation=30 if len(stats) > 6 else 0,
                       ha="right" if len(stats) > 6 else "center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "method comparison: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
