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

* **kernels side by side**: letKD-2 is timed with ``method.kernel=reference`` (the KD layers and
  template losses on whole (B·H·W)×K tensors; ``letkd2_step_s``, ``ratio``) and with the default
  ``method.kernel=fused`` (tiled, :mod:`letkd.fused_step`; ``fused_letkd2_step_s``,
  ``fused_ratio``). The KD, reference and fused steps are timed round-robin (one step of each in
  turn), so a load change on a shared machine hits all three alike; medians of ``--steps``.
  ``*_slowdown`` = step time / KD step time.

``--profile`` also writes the top operators (self CPU time) of one letKD-2 step of each kernel and
one KD step from ``torch.profiler``, and splits the letKD-2 steps' time into matrix products on
score-sized (B·H·W×K) operands — what the MAC count predicts — element-wise work on score-sized
tensors (BatchNorm, ReLU, softmax, KL, row norms: memory-bound, no MACs) and everything else. The
fused kernel's tiles are not score-sized: its split shows them under "everything else".

``--memory`` measures, for KD and both letKD-2 kernels at each ``--memory-batches`` batch, in a
fresh subprocess per configuration: **step peak** = the peak resident set size (VmHWM, reset just
before the step through ``/proc/self/clear_refs``) during the first training step minus the RSS
just before it — everything the step allocates: activations kept for backward, temporaries,
gradients, optimiser state (RSS, so allocator slack is included; Linux only); and **saved for
backward** = the bytes of the distinct non-parameter tensors autograd saves during one
``forward_train`` (``torch.autograd.graph.saved_tensors_hooks``), i.e. the activations a step holds
between forward and backward.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import statistics
import subprocess
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


def median_times(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median step time of each function, timed round-robin (one step of each in turn)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def saved_for_backward_bytes(d, batch: int, num_classes: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during one ``forward_train``."""
    params = {p.untyped_storage().data_ptr() for p in d.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, num_classes, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, losses = d.forward_train(x, y, index=torch.arange(batch), epoch=1)
    del losses
    return sum(seen.values())


def memory_child(method: str, kernel: str, teacher: str, student: str, batch: int, k_penult: int,
                 num_classes: int, precision: str) -> dict:
    """One configuration's memory (module docstring), measured in this (fresh) process."""
    extra = {"letkd2": {"k_penult": k_penult, "kernel": kernel}}
    d = build(method, teacher, student, num_classes, torch.device("cpu"), False, extra)
    step = step_fn(d, batch, num_classes, precision)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"method": method, "kernel": kernel if method == "letkd2" else None, "batch": batch,
            "step_peak_mib": (peak - before) / 1024.0,
            "saved_for_backward_mib": saved_for_backward_bytes(d, batch, num_classes) / 2**20}


def measure_memory(teacher: str, student: str, batches: list[int], args) -> list[dict]:
    """:func:`memory_child` for KD and both letKD-2 kernels at each batch, one subprocess each."""
    out = []
    for batch in batches:
        for method, kernel in (("kd", "-"), ("letkd2", "reference"), ("letkd2", "fused")):
            cmd = [sys.executable, __file__, "--memory-child", method, kernel, teacher, student, str(batch),
                   "--k-penult", str(args.k_penult), "--num-classes", str(args.num_classes),
                   "--precision", args.precision]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


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
    ap.add_argument("--tile-rows", type=int, default=0, help="method.tile_rows of the fused kernel (0: its default)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also time letKD-2 with train.compile=kd_layers (torch.compile of the reference kernel)")
    ap.add_argument("--memory", action="store_true", help="also measure the step's peak memory (module docstring)")
    ap.add_argument("--memory-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--memory-child", nargs=5, metavar=("METHOD", "KERNEL", "TEACHER", "STUDENT", "BATCH"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/letkd_cost_cpu.json")
    args = ap.parse_args()
    if args.memory_child:
        method, kernel, teacher, student, batch = args.memory_child
        print(json.dumps(memory_child(method, kernel, teacher, student, int(batch), args.k_penult,
                                      args.num_classes, args.precision)))
        return
    machine = {"hardware": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    rows = []
    for pair in args.pairs:
        teacher, student = pair.split(":")
        cfg = {k: {"letkd2": {"k_penult": args.k_penult, "kernel": k, "tile_rows": args.tile_rows}}
               for k in ("reference", "fused")}
        kd = build("kd", teacher, student, args.num_classes, torch.device("cpu"), False, {})
        l2 = build("letkd2", teacher, student, args.num_classes, torch.device("cpu"), False, cfg["reference"])
        l2f = build("letkd2", teacher, student, args.num_classes, torch.device("cpu"), False, cfg["fused"])
        x = torch.randn(args.batch, 3, 32, 32)
        t_macs = count_macs(kd.teacher, x)
        s_macs = count_macs(kd.student, x)
        kd_macs = t_macs + 3 * s_macs
        ex = letkd_extra(l2, args.batch)
        steps = {name: step_fn(d, args.batch, args.num_classes, args.precision)
                 for name, d in (("kd", kd), ("letkd2", l2), ("fused", l2f))}
        t = median_times(steps, args.steps, args.warmup)
        t_kd, t_l2, t_l2f = t["kd"], t["letkd2"], t["fused"]
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
               "predicted_slowdown": (t_kd + pred) / t_kd, "measured_slowdown": t_l2 / t_kd,
               "fused_letkd2_step_s": t_l2f, "fused_measured_extra_s": t_l2f - t_kd,
               "fused_ratio": (t_l2f - t_kd) / pred, "fused_measured_slowdown": t_l2f / t_kd,
               "fused_tile_rows": args.tile_rows or None, **machine}
        if args.compile:
            l2c = build("letkd2", teacher, student, args.num_classes, torch.device("cpu"), False, cfg["reference"])
            l2c.compile_hot_paths()
            t_l2c = median_times({"c": step_fn(l2c, args.batch, args.num_classes, args.precision)},
                                 args.steps, args.warmup)["c"]
            row.update({"letkd2_compiled_step_s": t_l2c, "measured_extra_compiled_s": t_l2c - t_kd,
                        "ratio_compiled": (t_l2c - t_kd) / pred})
        if args.profile:
            wide = {args.batch * lay["HxW"][0] * lay["HxW"][1] * lay["K"] for lay in ex["layers"].values()}
            for name, d in (("letkd2", l2), ("fused", l2f), ("kd", kd)):
                row[f"profile_{name}"], row[f"breakdown_{name}"] = profile_step(
                    step_fn(d, args.batch, args.num_classes, args.precision), wide)
        if args.memory:
            row["memory"] = measure_memory(teacher, student, args.memory_batches, args)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.startswith(("profile", "breakdown")) and k not in ("layers", "memory")}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"Machine: {machine['hardware']}, torch {machine['torch']}, {machine['threads']} threads, {args.precision}", "",
             "letKD-2 step over a KD step, both KD-layer kernels (same process, steps timed round-robin; MAC floor = "
             "(KD step + extra MACs at the KD step's rate) / KD step):", "",
             "| pair | KD step s | letKD-2 reference: step s (× KD) | letKD-2 fused: step s (× KD) | MAC floor × KD |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']}→{r['student']} | {r['kd_step_s']:.3f} | {r['letkd2_step_s']:.3f} "
                     f"({r['measured_slowdown']:.2f}×) | {r['fused_letkd2_step_s']:.3f} "
                     f"(**{r['fused_measured_slowdown']:.2f}×**) | {r['predicted_slowdown']:.2f}× |")
    lines += ["", "Extra time against the MAC count:", "",
              "| pair | KD step GMAC | letKD-2 extra GMAC (layers + targets) | KD GMAC/s | predicted extra s | "
              "reference: measured extra s (/ predicted) | fused: measured extra s (/ predicted) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']}→{r['student']} | {r['kd_step_gmacs']:.2f} | {r['extra_gmacs']:.3f} "
                     f"({r['extra_kd_layers_gmacs']:.3f} + {r['extra_targets_gmacs']:.3f}) | {r['kd_gmacs_per_s']:.1f} | "
                     f"{r['predicted_extra_s']:.3f} | {r['measured_extra_s']:.3f} ({r['ratio']:.2f}) | "
                     f"{r['fused_measured_extra_s']:.3f} (**{r['fused_ratio']:.2f}**) |")
    if any("ratio_compiled" in r for r in rows):
        lines += ["", "With `train.compile=kd_layers` (torch.compile of the reference kernel's KD layers and target + "
                  "loss functions; same process, compile time excluded by the warm-up steps):", "",
                  "| pair | letKD-2 compiled step s | measured extra s | measured / predicted |", "|---|---|---|---|"]
        for r in rows:
            if "ratio_compiled" in r:
                lines.append(f"| {r['teacher']}→{r['student']} | {r['letkd2_compiled_step_s']:.3f} | "
                             f"{r['measured_extra_compiled_s']:.3f} | **{r['ratio_compiled']:.2f}** |")
    if any("memory" in r for r in rows):
        lines += ["", "Memory of one training step (fresh process per row; step peak = peak RSS during the first step "
                  "minus the RSS before it; saved for backward = non-parameter tensors autograd keeps from one "
                  "forward_train):", "",
                  "| pair | batch | KD: step peak / saved MiB | letKD-2 reference: step peak / saved MiB | "
                  "letKD-2 fused: step peak / saved MiB |", "|---|---|---|---|---|"]
        for r in rows:
            for batch in sorted({m["batch"] for m in r.get("memory", [])}):
                cell = {(m["method"], m["kernel"]): m for m in r["memory"] if m["batch"] == batch}
                lines.append(f"| {r['teacher']}→{r['student']} | {batch} | " + " | ".join(
                    f"{cell[key]['step_peak_mib']:.0f} / {cell[key]['saved_for_backward_mib']:.0f}"
                    for key in (("kd", None), ("letkd2", "reference"), ("letkd2", "fused"))) + " |")
    if any("breakdown_letkd2" in r for r in rows):
        lines += ["", "Where the time goes (self CPU time of one profiled step; 'score-sized' = an operand with "
                  "B·H·W×K elements, K of either KD layer — the fused kernel's tiles are smaller, so its work on "
                  "them counts under 'everything else'):", "",
                  "| pair | kernel | matmuls on score-sized operands, ms (MAC prediction of all extra, ms) | element-wise "
                  "ops on score-sized tensors, ms (calls) | everything else: letKD-2 vs KD, ms |", "|---|---|---|---|---|"]
        for r in rows:
            k = r.get("breakdown_kd")
            for name, label in (("letkd2", "reference"), ("fused", "fused")):
                b = r.get(f"breakdown_{name}")
                if b:
                    lines.append(f"| {r['teacher']}→{r['student']} | {label} | {b['wide_matmul_ms']:.0f} "
                                 f"({1000 * r['predicted_extra_s']:.0f}) | {b['wide_elementwise_ms']:.0f} "
                                 f"({b['wide_elementwise_calls']}) | {b['other_ms']:.0f} vs "
                                 f"{k['other_ms'] + k['wide_matmul_ms'] + k['wide_elementwise_ms']:.0f} |")
    for r in rows:
        if "profile_letkd2" in r:
            lines += ["", f"Top operators by self CPU time, one step, {r['teacher']}→{r['student']}:", "",
                      "| op | letKD-2 reference ms (calls) | letKD-2 fused ms (calls) | KD ms (calls) |", "|---|---|---|---|"]
            tables = {name: {e["op"]: e for e in r[f"profile_{name}"]} for name in ("letkd2", "fused", "kd")}
            ops = list(dict.fromkeys([e["op"] for e in r["profile_letkd2"]] + [e["op"] for e in r["profile_fused"]]))

            def cell(name: str, op: str) -> str:
                e = tables[name].get(op)
                return "%.1f (%d)" % (e["self_ms"], e["calls"]) if e else "–"
            for op in ops:
                lines.append(f"| {op} | {cell('letkd2', op)} | {cell('fused', op)} | {cell('kd', op)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
