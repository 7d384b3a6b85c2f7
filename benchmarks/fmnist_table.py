"""The Fashion-MNIST benchmark table (issue 7): methods × pairs from a sweep's results.csv.

    python benchmarks/fmnist_table.py benchmarks/results/fmnist_benchmark/results.csv \
        --out benchmarks/results/fmnist_benchmark.md

Sweep labels are ``<pair>/<method>`` (``<pair>/ablation/<row>`` for the ablation rows); each cell
is mean ± sample std over seeds of the best-epoch and last-epoch test accuracy, with the seed count.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

NAMES = {"vanilla": "student alone", "kd": "KD", "fitnet": "FitNet", "at": "AT", "crd": "CRD", "dkd": "DKD",
         "reviewkd": "ReviewKD", "simkd": "SimKD", "quest": "QuEST", "letkd1": "letKD-1", "letkd2": "letKD-2"}
ABLATION = {"inter-a0": "inter only, α = 0", "inter-a1": "inter only, α = 1", "both-a0": "both, α = 0",
            "inter-a0_penult-a1": "inter α = 0 + penult α = 1", "inter-a1_penult-a0": "inter α = 1 + penult α = 0",
            "both-a1_unsupervised": "both, α = 1, no template loss (capacity only)"}


def cell(r: dict | None, key: str) -> str:
    if r is None or not r.get(f"{key}_mean"):
        return "–"
    m, s = float(r[f"{key}_mean"]), r.get(f"{key}_std") or ""
    return f"{m:.2f} ± {float(s):.2f}" if s not in ("", "nan") else f"{m:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = {r["label"]: r for r in csv.DictReader(open(args.csv, newline=""))}
    pairs = list(dict.fromkeys(lab.split("/")[0] for lab in rows))
    pair_name = {p: next(f"{r['teacher']} → {r['student']}" for lab, r in rows.items() if lab.startswith(p + "/"))
                 for p in pairs}
    link = Path(args.csv).parent.name
    out = [f"Command: `python {' '.join(sys.argv)}` (from `{link}/results.csv`, written by "
           f"`letkd sweep benchmarks/sweeps/fmnist_benchmark.yaml`)", "",
           "Test accuracy (%), mean ± sample std over seeds; best = best epoch, last = final epoch; "
           "n = seeds finished.", ""]
    head = "| method | " + " | ".join(f"{pair_name[p]} best | last | n" for p in pairs) + " |"
    out += [head, "|---|" + "---|---|---|" * len(pairs)]
    for m, name in NAMES.items():
        cells = []
        for p in pairs:
            r = rows.get(f"{p}/{m}")
            cells += [cell(r, "best"), cell(r, "last"), r["seeds"] if r else "0"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    abl = [(lab, r) for lab, r in rows.items() if "/ablation/" in lab]
    if abl:
        p = abl[0][0].split("/")[0]
        out += ["", f"Ablation ({pair_name[p]}; the QuEST, letKD-1 and letKD-2 rows above complete it):", "",
                "| variant | best | last | n |", "|---|---|---|---|"]
        for lab, r in abl:
            key = lab.split("/")[-1]
            out.append(f"| {ABLATION.get(key, key)} | {cell(r, 'best')} | {cell(r, 'last')} | {r['seeds']} |")
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
