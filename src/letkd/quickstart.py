"""``letkd quickstart``: the main job on the embedded default data (Fashion-MNIST).

Takes the shipped resnet20 teacher (``fashion_mnist/resnet20``, trained once on all 60k images
with a long schedule; :mod:`letkd.models.shipped`) or a teacher checkpoint you give, fits its
letKD targets, distils a resnet8 student with vanilla, KD, DKD and letKD-2 on the same schedule, evaluates each student WITHOUT the teacher
(rebuilt from its checkpoint, KD layers included) and prints a comparison table. Everything is
written under ``--out`` as an ordinary sweep (``sweep.yaml`` + one config per run), so
re-running continues / skips what is done, and ``letkd report OUT`` draws it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from letkd.models.shipped import resolve_weights_source

__all__ = ["quickstart"]

STUDENT_METHODS = ("vanilla", "kd", "dkd", "letkd2")
DEFAULT_TEACHER = "fashion_mnist/resnet20"


def _recipe(train_subset: int, epochs: int, precision: str, test_subset: int = 0) -> dict[str, Any]:
    return {
        "data": {"name": "fashion_mnist", "root": "data", "train_subset": train_subset, "test_subset": test_subset,
                 "augment": "crop_flip"},
        "train": {"epochs": epochs, "batch_size": 128, "test_batch_size": 500, "lr": 0.1, "momentum": 0.9,
                  "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine", "precision": precision,
                  "channels_last": True},
    }


def _write_yaml(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def quickstart(out: str | Path = "runs/quickstart", train_subset: int = 12000, epochs: int = 3,
               teacher: str = DEFAULT_TEACHER, seeds: tuple[int, ...] = (0,), precision: str = "auto",
               data_root: str = "data", test_subset: int = 0) -> list[dict[str, Any]]:
    """Run the quickstart and return the table rows (also printed and written to ``out``).

    ``teacher``: shipped weights of a resnet20 (``fashion_mnist/resnet20``) or a resnet20
    checkpoint file (e.g. ``runs/.../checkpoints/best.pt`` of ``letkd train-teacher``)."""
    import torch

    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import evaluate, rebuild_deployable, resolve_precision
    from letkd import models
    from letkd.sweep import mean_std, run_sweep

    t0 = time.time()
    out = Path(out)
    recipe = _recipe(train_subset, epochs, precision, test_subset)
    recipe["data"]["root"] = data_root
    teacher_file = resolve_weights_source(teacher)   # a shipped name is checked (sha256) here
    if not teacher_file.is_file():
        raise FileNotFoundError(f"quickstart: teacher checkpoint {teacher!r} does not exist; give a resnet20 "
                                f"checkpoint file or shipped weights ({DEFAULT_TEACHER})")
    pair = {**recipe, "model": {"name": "resnet8"}, "teacher": {"name": "resnet20", "checkpoint": str(teacher)}}
    methods = {
        "vanilla": {"name": "vanilla"},
        "kd": {"name": "kd"},
        "dkd": {"name": "dkd", "warmup": epochs},  # ramp β over the whole short schedule
        # the Fashion-MNIST letKD settings (docs/method.md): 10 classes -> K_inter = 80 sub-classes,
        # a 64-template codebook and λ 0.3 for a 3-epoch schedule
        "letkd2": {"name": "letkd2", "k_penult": 64, "lambda_penult": 0.3, "lambda_inter": 0.3,
                   "max_samples": 300000,
                   "targets_dir": str(out / "targets")},
    }
    runs = []
    for name in STUDENT_METHODS:
        cfg = {k: v for k, v in pair.items() if not (name == "vanilla" and k == "teacher")}
        _write_yaml(out / "configs" / f"{name}.yaml", {**cfg, "method": methods[name]})
        runs.append({"label": name, "config": f"configs/{name}.yaml"})
    _write_yaml(out / "sweep.yaml", {"out": str(out), "seeds": list(seeds), "runs": runs})
    print(f"letkd quickstart: Fashion-MNIST ({train_subset or 60000} training images, {epochs} epochs), "
          f"teacher resnet20 ({teacher}, not trained here) -> student resnet8 with {', '.join(STUDENT_METHODS)}; "
          f"writing to {out}")
    run_sweep(out / "sweep.yaml")

    # evaluate every student from its checkpoint alone (no teacher), as a user would deploy it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from letkd import data as datamod

    rows = []
    test = None
    for name in STUDENT_METHODS:
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            s = json.loads((run_dir / "summary.json").read_text())
            model, cfg, _ = rebuild_deployable(load_file(run_dir / "checkpoints" / "last.pt"), device)
            if test is None:
                test = datamod.build(cfg.data, batch_size=cfg.train.batch_size, test_batch_size=500, device=device)
            ev = evaluate(model, test.test_batches(), device, resolve_precision(cfg.train.precision, device))
            rows.append({"method": name, "seed": seed, "acc_without_teacher": ev["acc"], "best_acc": s["best_acc"],
                         "last_acc": s["last_acc"], "params": sum(p.numel() for p in model.parameters()),
                         "params_extra": s["params_extra"], "images_per_second": s["images_per_second"]})
    t_model = models.create("resnet20", num_classes=10, in_channels=1, checkpoint=teacher).to(device)
    t_acc = evaluate(t_model, test.test_batches(), device, resolve_precision(precision, device))["acc"]
    t_params = sum(p.numel() for p in t_model.parameters())
    lines = [f"teacher resnet20 ({teacher}; not trained by this run): {t_acc:.2f} % on this test set "
             f"({t_params:,} parameters)", "",
             "| method | seed | test acc, student alone (%) | best epoch acc (%) | parameters | extra | train img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['acc_without_teacher']:.2f} | {r['best_acc']:.2f} | "
                     f"{r['params']:,} | {r['params_extra']:,} | {r['images_per_second']:.0f} |")
    if len(seeds) > 1:
        lines += ["", f"mean ± sample std over {len(seeds)} seeds:", "",
                  "| method | test acc, student alone (%) | best epoch acc (%) |", "|---|---|---|"]
        for name in STUDENT_METHODS:
            acc = mean_std([r["acc_without_teacher"] for r in rows if r["method"] == name])
            best = mean_std([r["best_acc"] for r in rows if r["method"] == name])
            lines.append(f"| {name} | {acc[0]:.2f} ± {acc[1]:.2f} | {best[0]:.2f} ± {best[1]:.2f} |")
    lines += ["", f"wall time: {time.time() - t0:.0f} s (including any runs reused from an earlier call)"]
    text = "\n".join(lines)
    (out / "quickstart.md").write_text(text + "\n")
    (out / "quickstart.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + text)
    return rows
