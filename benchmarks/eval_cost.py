"""What the KD layers cost at evaluation: images/second of the deployed student (with its KD
layers) on a test batch, the layers' reference path against ``letkd.layers.without_scores``
(row tiles, no (B·H·W)×K scores; nothing at all with α = 0), beside the plain student.

    python benchmarks/eval_cost.py --pair resnet20:resnet8 --num-classes 10 --k-penult 4096 --batch 500 \
        --out benchmarks/results/eval_cost_cpu.json

Every configuration is timed round-robin (one batch of each in turn, medians of ``--reps``), so a
load change on a shared machine hits all of them alike; compare the ratios. Random weights and
inputs (the cost does not depend on their values); BN running statistics at their defaults.
Writes a JSON list (one object per method) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from letkd.layers import without_scores

from letkd_cost import median_times
from throughput import build


def deployed(method: str, teacher: str, student: str, num_classes: int, k_penult: int) -> torch.nn.Module:
    extra = {m: {"k_penult": k_penult} for m in ("letkd1", "letkd2", "quest")}
    return build(method, teacher, student, num_classes, torch.device("cpu"), False, extra).deployable().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="resnet20:resnet8", help="teacher:student")
    ap.add_argument("--methods", nargs="+", default=["letkd2", "letkd1", "quest"])
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--k-penult", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/eval_cost_cpu.json")
    args = ap.parse_args()
    teacher, student = args.pair.split(":")
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = deployed("vanilla", teacher, student, args.num_classes, args.k_penult)
    models = {m: deployed(m, teacher, student, args.num_classes, args.k_penult) for m in args.methods}

    def reference(model):
        return lambda: model(x)

    def scoreless(model):
        def run():
            with without_scores(model):
                return model(x)
        return run

    fns = {("vanilla", "plain"): reference(plain)}
    for m, model in models.items():
        fns[(m, "reference")] = reference(model)
        fns[(m, "scoreless")] = scoreless(model)
    with torch.no_grad():
        seconds = median_times(fns, args.reps, warmup=1)
        max_diff = {m: float((reference(model)() - scoreless(model)()).abs().max())   # same outputs, both paths
                    for m, model in models.items()}
    ips = {k: args.batch / t for k, t in seconds.items()}
    rows = []
    for m in args.methods:
        rows.append({"method": m, "teacher": teacher, "student": student, "k_penult": args.k_penult,
                     "batch": args.batch, "plain_student_img_s": ips[("vanilla", "plain")],
                     "reference_img_s": ips[(m, "reference")], "scoreless_img_s": ips[(m, "scoreless")],
                     "speedup": ips[(m, "scoreless")] / ips[(m, "reference")],
                     "max_abs_logit_diff": max_diff[m], "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "hardware": platform.machine()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    cmd = (f"python benchmarks/eval_cost.py --pair {args.pair} --num-classes {args.num_classes} --k-penult {args.k_penult} "
           f"--batch {args.batch} --reps {args.reps} --methods {' '.join(args.methods)} --out {args.out}")
    lines = [f"Command: `{cmd}`", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32; "
             f"deployed {student} with its KD layers (K_penult {args.k_penult}), batch {args.batch}, "
             "timed round-robin (medians)", "",
             "| method | plain student img/s | KD layers, reference path img/s | KD layers, without_scores img/s | speed-up | max abs logit diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['plain_student_img_s']:.0f} | {r['reference_img_s']:.0f} | "
                     f"{r['scoreless_img_s']:.0f} | {r['speedup']:.2f}× | {r['max_abs_logit_diff']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
