"""The ``letkd`` command.

    letkd train-teacher CONFIG [key=value ...] [--resume] [--overwrite]
    letkd distill CONFIG [key=value ...] [--resume] [--overwrite]
    letkd fit-targets CONFIG [key=value ...]
    letkd evaluate CHECKPOINT [key=value ...]
    letkd export CHECKPOINT --format onnx [--output FILE]
    letkd report RUN_OR_SWEEP_DIR [--out DIR] [--images N]
    letkd models [PATTERN] [--all] | methods | taps MODEL
    (commands that build models take --import MODULE: your own code registering models)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _load_cfg(args, base: dict | None = None):
    from letkd import config

    overrides = list(args.overrides)
    if getattr(args, "overwrite", False):
        overrides.append("run.overwrite=true")
    return config.load(args.config, overrides, base=base)


def cmd_train(args) -> int:
    from letkd.engine.trainer import run

    cfg = _load_cfg(args)
    if args.command == "train-teacher":
        if cfg.method_name != "vanilla" or cfg.teacher.name:
            from letkd.config import ConfigError

            raise ConfigError("train-teacher trains a network alone: the config must have method.name=vanilla "
                              "and no teacher.name (use `letkd distill` for distillation)")
    from letkd.engine import dist

    try:
        summary = run(cfg, resume=args.resume)
        if dist.is_main():
            print(json.dumps({k: summary[k] for k in ("method", "teacher", "student", "dataset", "seed", "epochs",
                                                      "best_acc", "last_acc", "best_epoch", "params_student",
                                                      "params_extra", "images_per_second", "wall_seconds",
                                                      "run_dir")}, indent=2))
    finally:
        dist.shutdown()
    return 0


def cmd_fit_targets(args) -> int:
    from letkd.engine.trainer import build

    cfg = _load_cfg(args)
    b = build(cfg)
    from letkd.methods.letkd import LetKD, ensure_targets, targets_path_for

    if not isinstance(b.distiller, LetKD) or not b.distiller.needs_targets:
        from letkd.config import ConfigError

        raise ConfigError(f"method {cfg.method_name!r} has no teacher targets to fit; use letkd1, letkd2 or quest "
                          f"(with a supervised KD layer)")
    from letkd.engine import dist

    path = targets_path_for(b.distiller, b.data)
    if args.force and dist.is_main():
        path.unlink(missing_ok=True)
    dist.barrier()
    t0 = time.time()
    try:
        targets = ensure_targets(b.distiller, b.data, path, progress=cfg.train.progress)
    finally:
        if not dist.is_main():
            dist.shutdown()
    if not dist.is_main():
        return 0
    dist.shutdown()
    print(json.dumps({"targets": str(path), "seconds": round(time.time() - t0, 2),
                      "timings": targets.get("timings"), "num_samples": targets.get("num_samples")}, indent=2,
                     default=str))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import evaluate, rebuild_deployable, resolve_precision
    from letkd.models.shipped import resolve_weights_source

    ck = load_file(resolve_weights_source(args.checkpoint))
    if args.overrides:
        from letkd import config

        ck["config"] = config.to_dict(config.load(None, args.overrides, base=ck["config"]))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, cfg, _ = rebuild_deployable(ck, device)
    except ValueError as e:
        raise ValueError(f"{args.checkpoint}: {e}") from None
    from letkd import data as datamod

    data = datamod.build(cfg.data, batch_size=cfg.train.batch_size, test_batch_size=cfg.train.test_batch_size,
                         device=device, seed=cfg.train.seed)
    t0 = time.time()
    res = evaluate(model, data.test_batches(), device, resolve_precision(args.precision, device))
    res.update(checkpoint=str(args.checkpoint), epoch=ck.get("epoch"), model=cfg.model.name,
               method=cfg.method_name, dataset=cfg.data.name, seconds=time.time() - t0,
               params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(res, indent=2))
    return 0


def cmd_export(args) -> int:
    from letkd.engine.checkpoint import load_file
    from letkd.export import export_onnx
    from letkd.models.shipped import resolve_weights_source

    ck = load_file(resolve_weights_source(args.checkpoint))
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    try:
        report = export_onnx(ck, out, verify=not args.no_verify)
    except ValueError as e:
        raise ValueError(f"{args.checkpoint}: {e}") from None
    print(json.dumps(report, indent=2))
    return 0


def cmd_quickstart(args) -> int:
    from letkd.quickstart import quickstart

    quickstart(args.out, train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
               seeds=tuple(args.seeds), precision=args.precision, data_root=args.data_root, teacher=args.teacher)
    return 0


def cmd_sweep(args) -> int:
    from letkd.sweep import run_sweep, tabulate

    if args.tables:
        if args.only or args.dry_run:
            raise ValueError("letkd sweep --tables runs nothing and tabulates every run of the sweep finished so far; "
                             "--only and --dry-run do not apply to it: drop them (or drop --tables to run)")
        root = tabulate(args.sweep, out=args.out or None)
    else:
        root = run_sweep(args.sweep, out=args.out or None, only=args.only or None, dry_run=args.dry_run)
    if not args.dry_run:
        print((root / "results.md").read_text())
    return 0


def cmd_report(args) -> int:
    from letkd.report import make_report

    written = make_report(args.path, out=args.out or None, images=args.images, overrides=list(args.overrides),
                          checkpoint=args.checkpoint, log=lambda m: print(m, file=sys.stderr))
    print("\n".join(str(p) for p in written))
    return 0


def cmd_diagnose(args) -> int:
    from letkd.report.decisions import diagnose_run, diagnostics_markdown

    device = args.device if args.device != "auto" else ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    result = diagnose_run(args.run_dir, out=args.out or None, checkpoint=args.checkpoint,
                          overrides=list(args.overrides), device=device)
    print(diagnostics_markdown(result, f"{result['method']} {result['teacher']} → {result['student']}"))
    return 0


def cmd_list(args) -> int:
    if args.command == "models" and (args.all or args.pattern):
        from letkd import models
        from letkd.models.catalog import list_names

        print("\n".join(list_names(args.pattern, registry=models.names())))
    elif args.command == "models":
        from letkd import models
        from letkd.models.shipped import SHIPPED

        with_weights: dict[str, list[str]] = {}
        for w in SHIPPED.values():
            with_weights.setdefault(w.arch, []).append(f"{w.name} ({w.test_acc:.2f} % test)")
        print("\n".join(f"{n:24s} shipped weights: {', '.join(with_weights[n])}" if n in with_weights else n
                        for n in models.names()))
    elif args.command == "methods":
        from letkd import methods

        print("\n".join(methods.names()))
    else:
        from letkd import models
        from letkd.models.autotaps import AUTO_TAPS, TapResolutionError
        from letkd.models.taps import feature_shapes, resolve

        shape = (args.in_channels, args.size, args.size)
        m = models.create(args.model, num_classes=args.num_classes, in_channels=args.in_channels, image_size=args.size)
        table, auto = dict(m.letkd_taps), [t for t in AUTO_TAPS if t not in m.letkd_taps]
        for t in auto:
            try:
                table[t] = resolve(m, t, args.model, shape)
            except TapResolutionError as e:
                print(f"letkd: {e}", file=sys.stderr)
        shapes = feature_shapes(m, table, shape) if table else {}
        for name, path in table.items():
            note = "  (auto: no hand-written table)" if name in auto else ""
            print(f"{name:24s} {path:28s} {tuple(shapes.get(name, ()))}{note}")
        if args.all:
            print("\nall module paths:")
            for n, mod in m.named_modules():
                if n:
                    print(f"  {n:40s} {type(mod).__name__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="letkd", description="Knowledge distillation with KD layers that let the student decide.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("train-teacher", "train a network alone (teachers, baselines)"),
                           ("distill", "distil a student from a teacher with any registered method")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=3")
        s.add_argument("--resume", action="store_true", help="continue the run in run.dir from checkpoints/last.pt")
        s.add_argument("--overwrite", action="store_true", help="replace an existing run in run.dir")
        s.set_defaults(func=cmd_train)

    s = sub.add_parser("fit-targets", help="fit (or check) the teacher targets of a letKD config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--force", action="store_true", help="refit even if a matching targets file exists")
    s.set_defaults(func=cmd_fit_targets)

    s = sub.add_parser("evaluate", help="test accuracy of a checkpoint's student (no teacher needed)")
    s.add_argument("checkpoint")
    s.add_argument("overrides", nargs="*", help="e.g. data.root=/path/to/data")
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("diagnose", help="the student's decisions vs the teacher's, per KD layer, on the test set")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a finished letkd1 / letkd2 / quest run directory")
    s.add_argument("overrides", nargs="*", help="config overrides for loading data/teacher, e.g. data.root=...")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--out", default="", help="output folder for decisions.{json,md} (default: RUN_DIR/report)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("export", help="export a checkpoint's student (with its KD layers)")
    s.add_argument("checkpoint")
    s.add_argument("--format", default="onnx", choices=["onnx"])
    s.add_argument("--output", "-o", default="")
    s.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("quickstart", help="teacher -> targets -> vanilla/KD/DKD/letKD-2 students on Fashion-MNIST, with a table")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--train-subset", type=int, default=12000, help="training images (0: all 60,000)")
    s.add_argument("--test-subset", type=int, default=0, help="class-balanced test images (0: all 10,000)")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--teacher", default="fashion_mnist/resnet20",
                   help="resnet20 teacher: shipped weights (default) or a checkpoint file")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--precision", default="auto", choices=["fp32", "bf16", "fp16", "auto"])
    s.add_argument("--data-root", default="data")
    s.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("sweep", help="run methods x pairs x seeds from a sweep file (resumable) and tabulate")
    s.add_argument("sweep", help="sweep YAML (see letkd.sweep)")
    s.add_argument("--out", default="", help="override the sweep's output folder")
    s.add_argument("--only", nargs="*", help="run only these labels")
    s.add_argument("--dry-run", action="store_true", help="list what would run")
    s.add_argument("--tables", action="store_true",
                   help="run nothing: write results.md / results.csv from the runs finished so far")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("report", help="PNG curves, method comparison and KD-layer template maps of a run or sweep")
    s.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    s.add_argument("overrides", nargs="*", help="config overrides for loading the test images, e.g. data.root=...")
    s.add_argument("--out", default="", help="output folder (default: RUN_OR_SWEEP_DIR/report)")
    s.add_argument("--images", type=int, default=8, help="test images in the template maps (0: none)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"], help="checkpoint for template maps")
    s.set_defaults(func=cmd_report)

    for name in ("models", "methods"):
        s = sub.add_parser(name, help=f"list registered {name}")
        s.set_defaults(func=cmd_list)
    s = sub.add_parser("taps", help="list a model's named taps (and with --all every module path)")
    s.add_argument("model")
    s.add_argument("--all", action="store_true")
    s.add_argument("--num-classes", type=int, default=100)
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--size", type=int, default=32)
    s.set_defaults(func=cmd_list)
    s = sub.choices["models"]
    s.add_argument("pattern", nargs="?", default=None,
                   help="shell pattern over every name, e.g. 'timm:convnext*' (timm tags: 'timm:resnet50.*')")
    s.add_argument("--all", action="store_true", help="also every torchvision:<name> and timm:<name> model")
    for name, s in sub.choices.items():
        if name not in ("methods", "quickstart"):
            s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                           help="import MODULE (your own code: a module path or a .py file) before running; "
                                "it registers models with letkd.models.register. Repeatable")
    return p


def _version() -> str:
    from letkd import __version__

    return f"letkd {__version__}"


def _import_user_modules(args) -> None:
    """``--import MODULE``: the user's own code, named on the command line (never by a config)."""
    if getattr(args, "imports", None):
        from letkd.models.user import import_modules

        import_modules(args.imports)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from letkd.config import ConfigError
    from letkd.engine.checkpoint import CheckpointError
    from letkd.engine.trainer import NonFiniteLoss, RunDirError

    import os

    if os.environ.get("LETKD_DEBUG"):
        _import_user_modules(args)
        return args.func(args)
    try:
        _import_user_modules(args)
        return args.func(args)
    except (ConfigError, CheckpointError, RunDirError, NonFiniteLoss, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"letkd: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
