"""Images/second of one full training step per method (teacher forward + student forward and
backward + optimiser step), and of a teacher forward alone, on random CIFAR-shaped data.

    python benchmarks/throughput.py --pair resnet32x4:resnet8x4 --methods vanilla kd dkd crd letkd1 letkd2 \
        --precisions fp32 bf16 --batch 64 --out benchmarks/results/throughput_cpu.json

Writes a JSON list (one object per row: method, teacher, student, precision, channels_last,
device, batch, images_per_second, ms_per_step, ...) and a Markdown table beside it. letKD
targets are random tensors of the right shapes: the step's cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from letkd import methods, models
from letkd.engine.trainer import autocast_context
from letkd.methods import Context


def fake_targets(d) -> None:
    """Random targets of the right shapes for a letKD distiller (throughput only)."""
    g = torch.Generator().manual_seed(0)
    t = {"meta": {"fake": True}}
    if d.supervised["penult"]:
        t["penult"] = {"centroids": torch.randn(d.params.k_penult, d.t_channels["penult"], generator=g)}
    if d.supervised["inter"]:
        c, m = d.t_channels["inter"], d.params.k_sub * d.ctx.num_classes
        dd = min(d.params.lda_dim, c, d.ctx.num_classes - 1)
        S = torch.rand(m, m, generator=g)
        t["inter"] = {"mean": torch.randn(c, generator=g), "W": torch.randn(c, dd, generator=g),
                      "centres": torch.randn(d.ctx.num_classes, d.params.k_sub, dd, generator=g),
                      "S": S / S.sum(1, keepdim=True)}
    d.set_targets(t)


def build(method: str, teacher: str, student: str, num_classes: int, device, channels_last: bool, extra: dict):
    torch.manual_seed(0)
    s = models.create(student, num_classes=num_classes)
    t = models.create(teacher, num_classes=num_classes)
    ctx = Context(num_classes=num_classes, image_size=(32, 32), num_train=50000, epochs=240,
                  student_arch=student, teacher_arch=teacher)
    d = methods.create(method, s, t, ctx, dict(extra.get(method, {})))
    d.to(device)
    if hasattr(d, "supervised") and d.needs_targets:
        fake_targets(d)
    if channels_last:
        d.to(memory_format=torch.channels_last)
    return d


def time_it(fn, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def make_step(d, batch: int, num_classes: int, precision: str, device, channels_last: bool = False):
    """One full training step of distiller ``d`` on fixed random data: teacher forward, student
    forward/backward, SGD update (also used by letkd_cost.py)."""
    torch.manual_seed(0)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    idx = torch.randint(0, 50000, (batch,), device=device)

    def step():
        with autocast_context(precision, device):
            _, losses = d.forward_train(x, y, index=idx, epoch=30)
        loss = sum(v.float() for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_method(method, teacher, student, precision, channels_last, batch, steps, warmup, device, num_classes, extra):
    d = build(method, teacher, student, num_classes, device, channels_last, extra)
    return time_it(make_step(d, batch, num_classes, precision, device, channels_last), steps, warmup, device)


def bench_forward(arch, precision, channels_last, batch, steps, warmup, device, num_classes, train_step=False):
    torch.manual_seed(0)
    m = models.create(arch, num_classes=num_classes).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if train_step:
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        y = torch.randint(0, num_classes, (batch,), device=device)

        def fn():
            with autocast_context(precision, device):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        m.eval()

        def fn():
            with torch.no_grad(), autocast_context(precision, device):
                m(x)
    return time_it(fn, steps, warmup, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs="*", default=["resnet32x4:resnet8x4"], help="teacher:student (none: skip)")
    ap.add_argument("--methods", nargs="*", default=["vanilla", "kd", "dkd", "crd", "letkd1", "letkd2"])
    ap.add_argument("--models", nargs="*", default=[], help="also time a teacher forward and a plain train step of these")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--k-penult", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/throughput_cpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    extra = {m: {"k_penult": args.k_penult} for m in ("letkd1", "letkd2", "quest")}
    machine = {"hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    rows = []

    def add(row, times):
        med = statistics.median(times)
        row.update(device=device.type, batch=args.batch, ms_per_step=1000 * med,
                   images_per_second=args.batch / med, steps=len(times), **machine)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "teacher", "student", "precision", "channels_last",
                                             "images_per_second")}), flush=True)

    for prec in args.precisions:
        cl = prec != "fp32"  # fp32 in the default layout; bf16/fp16 with channels_last
        for arch in args.models:
            add({"method": "teacher_forward", "teacher": arch, "student": None, "precision": prec, "channels_last": cl},
                bench_forward(arch, prec, cl, args.batch, args.steps, args.warmup, device, args.num_classes))
            add({"method": "train_step", "teacher": None, "student": arch, "precision": prec, "channels_last": cl},
                bench_forward(arch, prec, cl, args.batch, args.steps, args.warmup, device, args.num_classes, True))
        for pair in args.pair:
            teacher, student = pair.split(":")
            for method in args.methods:
                add({"method": method, "teacher": teacher, "student": student, "precision": prec, "channels_last": cl,
                     "k_penult": args.k_penult if method.startswith("letkd") else None},
                    bench_method(method, teacher, student, prec, cl, args.batch, args.steps, args.warmup, device,
                                 args.num_classes, extra))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"Command: `python {' '.join(__import__('sys').argv)}`", "",
             f"Machine: {machine['hardware']}, torch {machine['torch']}, {machine['threads']} threads", "",
             "| method | teacher | student | precision | channels_last | batch | img/s | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['teacher'] or '–'} | {r['student'] or '–'} | {r['precision']} | "
                     f"{r['channels_last']} | {r['batch']} | {r['images_per_second']:.1f} | {r['ms_per_step']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
