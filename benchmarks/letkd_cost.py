"""What letKD-2 adds to a KD step: counted multiply-accumulates (MACs) vs measured time.

    python benchmarks/letkd_cost.py --pairs resnet56:resnet20 resnet32x4:resnet8x4 --batch 64 \
        --k-penult 4096 --out benchmarks/results/letkd_cost_cpu.json [--profile]

For each pair, at one batch:

* **KD step MACs** = teacher forward + 3 × student forward (forward, then backward ≈ 2 × forward:
  gradients w.r.t. inputs and weights). Counted by hooks on every ``nn.Conv2d`` / ``nn.Linear``
  (``out elements × in_ch/groups × kh × kw``; BN, ReLU, pooling and the loss are not MACs).
* **letKD-2 extra MACs** (METHOD §1, §3):
  - the two KD layers (cosine 1×1 templates ``C→K`` and values ``K→C``) at the intermediate and
    penultimate taps, forward + backward: ``3 × 2 · B·H·W·C·K`` per layer;
  - the teacher targets, forward only: the codebook distances ``B·H·W·K_p·C_t`` (Alg. 1) and the
    LDA projection + nearest sub-class centre ``B·H·W·(C_t·d + K_sub·d)`` (Alg. 2);
  - the template losses: softmax/KL over ``B·H·W × K`` are element-wise (no MACs); their element
    count is reported beside.
* **prediction**: extra time = extra MACs / (KD step MACs / KD step time), i.e. at the KD step's
  own MAC rate; **measured**: letKD-2 step time − KD step time (medians, same process, same data).
  ``ratio`` = measured / predicted (issue 6: ≤ 1.25).

``--profile`` also writes the top operators (self CPU time) of one letKD-2 and one KD step from
``torch.profiler``, and splits the letKD-2 step's time into matrix products on score-sized
(B·H·W×K) operands — what the MAC count predicts — element-wise work on score-sized tensors
(BatchNorm, ReLU, softmax, KL, row norms: memory-bound, no MACs) and everything else.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build, make_step  # noqa: E402  (same construction and fake targets as the throughput benchmark)

from letkd.models.taps import feature_shapes  # noqa: E402


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` over its ``nn.Conv2d`` and ``nn.Linear`` modules (hooks, no grad)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def letkd_extra(d, batch: int) -> dict:
    """The MACs letKD-2 adds to a KD step (see the module docstring), from the built distiller."""
    out = {"kd_layers_fwd": 0, "targets": 0, "loss_elements": 0, "layers": {}}
    for role, layer in d.kd.items():
        h, w = d.s_sizes[role]
        loc = batch * h * w
        c, k = layer.channels, layer.num_templates
        fwd = loc * c * k * (2 if layer.alpha != 0 else 1)
        out["kd_layers_fwd"] += fwd
        out["layers"][role] = {"C": c, "K": k, "HxW": [h, w], "fwd_macs": fwd}
        if d.supervised[role]:
            out["loss_elements"] += loc * k
            ct = d.t_channels[role]
            if role == "penult":
                out["targets"] += loc * k * ct
            else:
                dd = d.lda_W.shape[1]
                out["targets"] += loc * (ct * dd + d.params.k_sub * dd)
    out["kd_layers_fwd_bwd"] = 3 * out["kd_layers_fwd"]
    out["total"] = out["kd_layers_fwd_bwd"] + out["targets"]
    return out


def step_fn(d, batch: int, num_classes: int, precision: str):
    return make_step(d, batch, num_classes, precision, torch.device("cpu"))


def median_time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def profile_step(fn, wide_numels: set[int], rows: int = 15) -> tuple[list[dict], dict]:
    """Profile one step (after one unprofiled call) and return (a) its top operators by self CPU
    time and (b) the step's self CPU time split by what the ops touch: matrix products with a
    B·H·W×K (score-sized) operand, other ("element-wise") ops with such an operand — BN, ReLU,
    softmax, KL, norms over the template scores — and everything else."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000.0, "calls": e.count} for e in avgs]
    split = {"wide_matmul_ms": 0.0, "wide_elementwise_ms": 0.0, "wide_elementwise_calls": 0, "other_ms": 0.0}
    for e in prof.key_averages(group_by_input_shape=True):
        numels = {math.prod(sh) for sh in (e.input_shapes or []) if sh}
        ms = e.self_cpu_time_total / 1000.0
        if numels & wide_numels:
            if e.key in MATMULS:
                split["wide_matmul_ms"] += ms
            else:
                split["wide_elementwise_ms"] += ms
                split["wide_elementwise_calls"] += e.count
        else:
            split["other_ms"] += ms
    return top, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["resnet56:resnet20", "resnet32x4:resnet8x4"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k-penult", type=int, default=4096)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also time letKD-2 with train.compile=kd_layers (torch.compile of the KD layers and losses)")
    ap.add_argument("--out", default="benchmarks/results/letkd_cost_cpu.json")
    args = ap.parse_args()
    machine = {"hardware": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    rows = []
    for pair in args.pairs:
        teacher, student = pair.split(":")
        extra_cfg = {"letkd2": {"k_penult": args.k_penult}}
        kd = build("kd", teacher, student, args.num_classes, torch.device("cpu"), False, {})
        l2 = build("letkd2", teacher, student, args.num_classes, torch.device("cpu"), False, extra_cfg)
        x = torch.randn(args.batch, 3, 32, 32)
        t_macs = count_macs(kd.teacher, x)
        s_macs = count_macs(kd.student, x)
        kd_macs = t_macs + 3 * s_macs
        ex = letkd_extra(l2, args.batch)
        t_kd = median_time(step_fn(kd, args.batch, args.num_classes, args.precision), args.steps, args.warmup)
        t_l2 = median_time(step_fn(l2, args.batch, args.num_classes, args.precision), args.steps, args.warmup)
        rate = kd_macs / t_kd
        pred = ex["total"] / rate
        meas = t_l2 - t_kd
        row = {"teacher": teacher, "student": student, "batch": args.batch, "k_penult": args.k_penult,
               "precision": args.precision, "device": "cpu",
               "teacher_fwd_gmacs": t_macs / 1e9, "student_fwd_gmacs": s_macs / 1e9,
               "kd_step_gmacs": kd_macs / 1e9, "extra_gmacs": ex["total"] / 1e9,
               "extra_kd_layers_gmacs": ex["kd_layers_fwd_bwd"] / 1e9, "extra_targets_gmacs": ex["targets"] / 1e9,
               "loss_elements_M": ex["loss_elements"] / 1e6, "layers": ex["layers"],
               "kd_step_s": t_kd, "letkd2_step_s": t_l2, "kd_gmacs_per_s": rate / 1e9,
               "predicted_extra_s": pred, "measured_extra_s": meas, "ratio": meas / pred,
               "predicted_slowdown": (t_kd + pred) / t_kd, "measured_slowdown": t_l2 / t_kd, **machine}
        if args.compile:
            l2c = build("letkd2", teacher, student, args.num_classes, torch.device("cpu"), False, extra_cfg)
            l2c.compile_hot_paths()
            t_l2c = median_time(step_fn(l2c, args.batch, args.num_classes, args.precision), args.steps, args.warmup)
            row.update({"letkd2_compiled_step_s": t_l2c, "measured_extra_compiled_s": t_l2c - t_kd,
                        "ratio_compiled": (t_l2c - t_kd) / pred})
        if args.profile:
            wide = {args.batch * lay["HxW"][0] * lay["HxW"][1] * lay["K"] for lay in ex["layers"].values()}
            for name, d in (("letkd2", l2), ("kd", kd)):
                row[f"profile_{name}"], row[f"breakdown_{name}"] = profile_step(
                    step_fn(d, args.batch, args.num_classes, args.precision), wide)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.startswith("profile") and k != "layers"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"Machine: {machine['hardware']}, torch {machine['torch']}, {machine['threads']} threads, {args.precision}", "",
             "| pair | KD step GMAC | letKD-2 extra GMAC (layers + targets) | KD step s | letKD-2 step s | "
             "KD GMAC/s | predicted extra s | measured extra s | measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']}→{r['student']} | {r['kd_step_gmacs']:.2f} | {r['extra_gmacs']:.3f} "
                     f"({r['extra_kd_layers_gmacs']:.3f} + {r['extra_targets_gmacs']:.3f}) | {r['kd_step_s']:.3f} | "
                     f"{r['letkd2_step_s']:.3f} | {r['kd_gmacs_per_s']:.1f} | {r['predicted_extra_s']:.3f} | "
                     f"{r['measured_extra_s']:.3f} | **{r['ratio']:.2f}** |")
    if any("ratio_compiled" in r for r in rows):
        lines += ["", "With `train.compile=kd_layers` (torch.compile of the KD layers and the target + loss functions; "
                  "same process, compile time excluded by the warm-up steps):", "",
                  "| pair | letKD-2 compiled step s | measured extra s | measured / predicted |", "|---|---|---|---|"]
        for r in rows:
            if "ratio_compiled" in r:
                lines.append(f"| {r['teacher']}→{r['student']} | {r['letkd2_compiled_step_s']:.3f} | "
                             f"{r['measured_extra_compiled_s']:.3f} | **{r['ratio_compiled']:.2f}** |")
    if any("breakdown_letkd2" in r for r in rows):
        lines += ["", "Where the extra time goes (self CPU time of one profiled step; 'score-sized' = an operand with "
                  "B·H·W×K elements, K of either KD layer):", "",
                  "| pair | matmuls on score-sized operands, ms (MAC prediction of all extra, ms) | element-wise ops "
                  "on score-sized tensors, ms (calls) | everything else: letKD-2 vs KD, ms |", "|---|---|---|---|"]
        for r in rows:
            b, k = r.get("breakdown_letkd2"), r.get("breakdown_kd")
            if b:
                lines.append(f"| {r['teacher']}→{r['student']} | {b['wide_matmul_ms']:.0f} ({1000 * r['predicted_extra_s']:.0f}) | "
                             f"{b['wide_elementwise_ms']:.0f} ({b['wide_elementwise_calls']}) | "
                             f"{b['other_ms']:.0f} vs {k['other_ms'] + k['wide_matmul_ms'] + k['wide_elementwise_ms']:.0f} |")
    for r in rows:
        if "profile_letkd2" in r:
            lines += ["", f"Top operators by self CPU time, one step, {r['teacher']}→{r['student']}:", "",
                      "| op | letKD-2 ms (calls) | KD ms (calls) |", "|---|---|---|"]
            kd_ops = {e["op"]: e for e in r["profile_kd"]}
            for e in r["profile_letkd2"]:
                k = kd_ops.get(e["op"])
                kd_cell = "%.1f (%d)" % (k["self_ms"], k["calls"]) if k else "–"
                lines.append(f"| {e['op']} | {e['self_ms']:.1f} ({e['calls']}) | {kd_cell} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
