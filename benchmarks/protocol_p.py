"""Protocol P (issue 14): the results page of the paper-shaped Fashion-MNIST sweep.

    python benchmarks/protocol_p.py benchmarks/results/fmnist_paper_protocol \
        --out benchmarks/results/fmnist_paper_protocol.md

Reads every finished run under ``<sweep dir>/<label>/seed<s>/`` (``summary.json`` +
``metrics.jsonl``) and writes, per label: best-epoch and last-epoch test accuracy as mean ± sample
std over the finished seeds (n), the mean wall time of a run (with the threads and CPU it ran on),
the per-epoch mean test accuracy, a fit table (last-epoch training accuracy beside test loss and
accuracy), and the verdict lines of the issue — letKD-2 vs KD (and vs the plain student and DKD) and
letKD-2 vs letKD-1 vs QuEST — each saying whether the gap of the last-epoch means exceeds one
std (the larger of the two rows' sample stds). Runs still in progress are listed, not used.
Nothing here selects on the test set: "best" is reported beside "last", never instead of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ORDER = ["vanilla", "kd", "dkd", "quest", "letkd1", "letkd2", "letkd2_fmnist_settings", "letkd2_plus_kd",
         "reviewkd", "crd", "vanilla_r14", "kd_r14", "letkd2_r14"]
NAMES = {"vanilla": "student alone", "kd": "KD", "dkd": "DKD", "quest": "QuEST", "letkd1": "letKD-1",
         "letkd2": "letKD-2", "letkd2_fmnist_settings": "letKD-2, K 64 / λ 0.3", "letkd2_plus_kd": "letKD-2 + KD",
         "reviewkd": "ReviewKD", "crd": "CRD", "vanilla_r14": "student alone (resnet14)", "kd_r14": "KD (resnet14)",
         "letkd2_r14": "letKD-2 (resnet14)"}


def load_runs(root: Path) -> dict[str, dict]:
    """``{label: {"done": [(seed, summary, epochs)], "running": [(seed, epochs so far)]}}``."""
    out: dict[str, dict] = {}
    for run in sorted(root.glob("*/seed*")):
        if not run.is_dir() or not run.name[4:].isdigit():
            continue
        label, seed = run.parent.name, int(run.name[4:])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (run / "metrics.jsonl").exists() else []
        entry = out.setdefault(label, {"done": [], "running": []})
        if (run / "summary.json").exists():
            entry["done"].append((seed, json.loads((run / "summary.json").read_text()), rows))
        else:
            entry["running"].append((seed, len(rows)))
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "–"
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def verdict(a: str, b: str, runs: dict[str, dict]) -> str:
    """One sentence: a vs b on last-epoch accuracy, and whether the gap exceeds one std."""
    la = [s["last_acc"] for _, s, _ in runs.get(a, {}).get("done", [])]
    lb = [s["last_acc"] for _, s, _ in runs.get(b, {}).get("done", [])]
    if not la or not lb:
        return f"{NAMES[a]} vs {NAMES[b]}: not yet measured ({len(la)} and {len(lb)} finished seeds)."
    (ma, sa), (mb, sb) = mean_std(la), mean_std(lb)
    gap, std = ma - mb, max(sa, sb)
    word = "ahead of" if gap > 0 else "behind" if gap < 0 else "level with"
    if min(len(la), len(lb)) < 2:
        size = "one seed, so no std to compare the gap with"
    else:
        size = f"the gap {'exceeds' if abs(gap) > std else 'does not exceed'} one std ({std:.2f})"
    return (f"{NAMES[a]} {ma:.2f} is {word} {NAMES[b]} {mb:.2f} by {abs(gap):.2f} points at the last epoch "
            f"(n = {len(la)} / {len(lb)}); {size}.")


def fit_table(labels: list[str], runs: dict[str, dict]) -> list[str]:
    """How well each method fits its training set: the last epoch's training accuracy (on the augmented
    batches it trained on) beside its test loss and accuracy, mean ± sample std over the finished seeds."""
    out = ["", "Fit at the last epoch (training accuracy on the augmented training batches; test loss and accuracy "
           "on the full test set), mean ± sample std over the finished seeds:", "",
           "| method | n | train acc (%) | test loss | test acc (%) | train − test (points) |", "|---|---|---|---|---|---|"]
    for lab in labels:
        last = [rows[-1] for _, _, rows in runs[lab]["done"] if rows and "train_acc" in rows[-1]]
        if not last:
            continue
        train, test = [r["train_acc"] for r in last], [r["test_acc"] for r in last]
        loss = [r["test_loss"] for r in last if "test_loss" in r]
        out.append(f"| {NAMES[lab]} | {len(last)} | {fmt(train)} | {fmt(loss, 3)} | {fmt(test)} | "
                   f"{statistics.fmean(train) - statistics.fmean(test):.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    root = Path(args.sweep_dir)
    runs = load_runs(root)
    labels = [lab for lab in ORDER if lab in runs] + sorted(set(runs) - set(ORDER))
    NAMES.update({lab: lab for lab in labels if lab not in NAMES})
    out = [f"Command: `python {' '.join(sys.argv)}`", "",
           "Protocol P (issue 14; `benchmarks/sweeps/fmnist_paper_protocol.yaml`): shipped teacher "
           "fashion_mnist/resnet20 (93.97 %), student resnet8, 10,000 class-balanced training images, 30 epochs, "
           "batch 64, SGD Nesterov lr 0.05, wd 5e-4, ×0.1 at epochs 19/23/26, crop + flip, full 10,000-image test "
           "set; the paper's CIFAR method settings (letKD K_penult 4096 on all locations, K_sub 8, λ 1, α 1, τ 1).",
           "", "Test accuracy (%), mean ± sample std over finished seeds:", "",
           "| method | n | best epoch | last epoch | seeds (last) | wall time per run | threads, CPU | in progress |",
           "|---|---|---|---|---|---|---|---|"]
    for lab in labels:
        done, running = runs[lab]["done"], runs[lab]["running"]
        best = [s["best_acc"] for _, s, _ in done]
        last = [s["last_acc"] for _, s, _ in done]
        wall = [s["wall_seconds"] for _, s, _ in done if s.get("wall_seconds")]
        where = sorted({f"{s.get('threads', '?')} × {s.get('cpu', '?')}" for _, s, _ in done})
        seeds = ", ".join(f"s{seed}: {s['last_acc']:.2f}" for seed, s, _ in sorted(done, key=lambda t: t[0]))
        prog = ", ".join(f"s{seed} at epoch {n}" for seed, n in running) or "–"
        out.append(f"| {NAMES[lab]} | {len(done)} | {fmt(best)} | {fmt(last)} | {seeds or '–'} | "
                   f"{(statistics.fmean(wall) / 60):.0f} min | {'; '.join(where) or '–'} | {prog} |"
                   if wall else f"| {NAMES[lab]} | 0 | – | – | – | – | – | {prog} |")
    out += ["", "Verdicts (last-epoch accuracy; 'one std' = the larger sample std of the two rows):", ""]
    for a, b in [("letkd2", "kd"), ("letkd2", "vanilla"), ("letkd2", "dkd"), ("letkd2", "letkd1"), ("letkd1", "quest"),
                 ("letkd2", "quest")]:
        out.append(f"- {verdict(a, b, runs)}")
    out += fit_table(labels, runs)
    epochs = max((len(rows) for lab in labels for _, _, rows in runs[lab]["done"]), default=0)
    if epochs:
        shown = [lab for lab in labels if runs[lab]["done"]]
        out += ["", "Per-epoch test accuracy (%), mean over the finished seeds:", "",
                "| epoch | lr | " + " | ".join(NAMES[lab] for lab in shown) + " |",
                "|---|---|" + "---|" * len(shown)]
        by_epoch = {lab: [{r["epoch"]: r for r in rows} for _, _, rows in runs[lab]["done"]] for lab in shown}
        for e in range(1, epochs + 1):
            cells, lr = [], ""
            for lab in shown:
                accs = [rows[e]["test_acc"] for rows in by_epoch[lab] if e in rows and "test_acc" in rows[e]]
                lr = lr or next((f"{rows[e]['lr']:g}" for rows in by_epoch[lab] if e in rows), "")
                cells.append(f"{statistics.fmean(accs):.2f}" if accs else "–")
            out.append(f"| {e} | {lr} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
