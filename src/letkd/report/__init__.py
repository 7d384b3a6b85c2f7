"""``letkd report RUN_OR_SWEEP_DIR``: PNG plots of a run or of a sweep.

* A **run directory** (``metrics.jsonl`` / ``summary.json`` / ``config.yaml``):
  ``accuracy.png`` (train / test accuracy vs epoch), ``losses.png`` (every loss term in its own
  panel) and, when its checkpoint's student has KD layers (letkd1 / letkd2 / quest),
  ``template_maps_<layer>.png`` + ``template_maps.json`` (see :mod:`letkd.report.templates`).
* A **sweep directory** (``results.csv`` and/or run directories below it, ``<label>/seed<s>``):
  ``sweep_test_acc.png`` (every run's test accuracy, coloured by label), ``comparison.png``
  (+ ``comparison.csv``: mean ± sample std over seeds of best-epoch and last-epoch accuracy per
  label, from each run's ``summary.json``), and under ``runs/<label>_<seed>/`` each run's curves;
  template maps for the first finished seed of every label whose method has KD layers.

Everything goes to ``<dir>/report/`` (or ``out``), with an ``index.md`` that shows the images.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from letkd.report.curves import (ReportError, label_stats, plot_accuracy, plot_comparison, plot_losses,
                                 plot_sweep_curves, read_metrics, read_summary)

__all__ = ["make_report", "is_run_dir", "find_runs", "ReportError"]

_RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")
_KD_METHODS = {"letkd1", "letkd2", "quest"}


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in _RUN_FILES)


def find_runs(root: Path) -> list[Path]:
    """Run directories below ``root`` (not ``root`` itself, nor inside ``report`` folders)."""
    root = Path(root)
    found = set()
    for f in _RUN_FILES:
        for p in root.rglob(f):
            d = p.parent
            if d != root and "report" not in d.relative_to(root).parts:
                found.add(d)
    # a run directory never contains another run (skip e.g. nested teacher runs inside a run)
    runs = sorted(found)
    return [d for d in runs if not any(o != d and o in d.parents for o in runs)]


def _label_of(root: Path, run: Path) -> tuple[str, str]:
    rel = run.relative_to(root)
    if len(rel.parts) > 1 and rel.name.startswith("seed"):
        return Path(*rel.parts[:-1]).as_posix(), rel.name
    return rel.as_posix(), ""


def _has_kd_layers(run: Path) -> bool | None:
    """From config.yaml: True/False when the method is known, None when unreadable."""
    try:
        import yaml

        m = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("method") or {}
    except Exception:  # noqa: BLE001 - a broken config only means "unknown"
        return None
    name = str(m.get("name", ""))
    if name in _KD_METHODS:
        return bool(m.get("use_penult", True) or m.get("use_inter", name == "letkd2"))
    return "use_penult" in m or "use_inter" in m


def _run_curves(run: Path, out: Path, title: str, log) -> list[Path]:
    rows = read_metrics(run)
    if not rows:
        log(f"{run}: no metrics (metrics.jsonl missing or empty) — no curves")
        return []
    written = []
    for fn, name in ((plot_accuracy, "accuracy.png"), (plot_losses, "losses.png")):
        try:
            written.append(fn(rows, out / name, title=f"{title}: {name[:-4]}" if title else ""))
        except ReportError as e:
            log(f"{run}: {e} — no {name}")
    return written


def _index(out: Path, written: list[Path], heading: str) -> Path:
    lines = [f"# {heading}", ""]
    for p in written:
        rel = p.relative_to(out).as_posix() if p.is_relative_to(out) else str(p)
        lines.append(f"## {rel}\n\n![{rel}]({rel})\n" if p.suffix == ".png" else f"- [{rel}]({rel})")
    idx = out / "index.md"
    idx.write_text("\n".join(lines) + "\n")
    return idx


def make_report(path: str | Path, out: str | Path | None = None, images: int = 8,
                overrides: list[str] | None = None, checkpoint: str = "best",
                log: Callable[[str], None] = print) -> list[Path]:
    """Write the report of a run or sweep directory; return the files written."""
    from letkd.report.templates import template_maps

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such run or sweep directory: {root}")
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    if is_run_dir(root) and not (root / "results.csv").is_file():
        s = read_summary(root) or {}
        title = " ".join(str(x) for x in (s.get("method"), s.get("student")) if x) or root.name
        if not read_metrics(root):
            log(f"{root}: no metrics.jsonl (or it is empty): the run has not finished an epoch — no curves")
        else:
            written += _run_curves(root, out, title, log)
        if images > 0:
            written += template_maps(root, out, images, overrides, checkpoint, log=log)
        if not written:
            raise ReportError(f"{root}: nothing to report (no metrics and no checkpoint with KD layers)")
        written.append(_index(out, written, f"report: {root}"))
        return written

    runs = find_runs(root)
    if not runs:
        raise ReportError(f"{root} is neither a run directory (metrics.jsonl, summary.json, config.yaml) nor a sweep "
                          f"directory (run directories <label>/seed<s> below it)")
    labelled = [(*_label_of(root, r), r) for r in runs]
    order: list[str] = []
    if (root / "results.csv").is_file():
        with open(root / "results.csv", newline="") as f:
            order = [row["label"] for row in csv.DictReader(f) if row.get("label")]
    rank = {lab: i for i, lab in enumerate(order)}
    labelled.sort(key=lambda t: (rank.get(t[0], len(rank)), t[0], t[1]))

    curves = [(lab, name, read_metrics(r)) for lab, name, r in labelled]
    no_metrics = [r for (lab, name, rows), (_, _, r) in zip(curves, labelled) if not rows]
    if no_metrics:
        log(f"{len(no_metrics)} run(s) without metrics.jsonl: " + ", ".join(str(r.relative_to(root)) for r in no_metrics))
    try:
        written.append(plot_sweep_curves(curves, out / "sweep_test_acc.png", title=f"{root.name}: test accuracy per run"))
    except ReportError as e:
        log(f"{root}: {e} — no sweep_test_acc.png")
    summaries = [(lab, s) for lab, _, r in labelled if (s := read_summary(r))]
    stats = label_stats(summaries)
    try:
        written.append(plot_comparison(stats, out / "comparison.png",
                                       title=f"{root.name}: best / last epoch accuracy, mean ± std over seeds"))
        with open(out / "comparison.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "n", "best_mean", "best_std", "last_mean", "last_std"])
            for r in stats:
                w.writerow([r["label"], r["n"], r["best_mean"], r["best_std"], r["last_mean"], r["last_std"]])
        written.append(out / "comparison.csv")
    except ReportError as e:
        log(f"{root}: {e} — no comparison.png")

    mapped: set[str] = set()
    no_kd: list[str] = []
    for lab, name, r in labelled:
        sub = out / "runs" / (lab.replace("/", "_") + (f"_{name}" if name else ""))
        written += _run_curves(r, sub, f"{lab} {name}".strip(), lambda m: log(m))
        if images <= 0 or lab in mapped:
            continue
        kd = _has_kd_layers(r)
        if kd is False:
            if lab not in no_kd:
                no_kd.append(lab)
            continue
        maps = template_maps(r, sub, images, overrides, checkpoint, log=log)
        if maps:
            mapped.add(lab)
            written += maps
    if images > 0 and no_kd:
        log(f"no KD layers (no template maps): {', '.join(no_kd)}")
    if not written:
        raise ReportError(f"{root}: nothing to report (no metrics, no summaries)")
    written.append(_index(out, written, f"sweep report: {root}"))
    return written
