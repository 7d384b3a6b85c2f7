"""``letkd quickstart``: the main job on the embedded default data (Fashion-MNIST).

Trains (or reuses) a resnet20 teacher, fits its letKD targets, distils a resnet8 student with
vanilla, KD, DKD and letKD-2 on the same schedule, evaluates each student WITHOUT the teacher
(rebuilt from its checkpoint, KD layers included) and prints a comparison table. Everything is
written under ``--out`` as an ordinary sweep (``sweep.yaml`` + one config per run), so
re-running continues / skips what is done, and ``letkd report OUT`` draws it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["quickstart"]

STUDENT_METHODS = ("vanilla", "kd", "dkd", "letkd2")


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
               teacher_epochs: int | None = None, seeds: tuple[int, ...] = (0,), precision: str = "auto",
               data_root: str = "data", test_subset: int = 0) -> list[dict[str, Any]]:
    """Run the quickstart and return the table rows (also printed and written to ``out``)."""
    import torch

    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import evaluate, rebuild_deployable, resolve_precision
    from letkd.sweep import mean_std, run_sweep

    t0 = time.time()
    out = Path(out)
    recipe = _recipe(train_subset, epochs, precision, test_subset)
    recipe["data"]["root"] = data_root
    teacher_cfg = {**recipe, "model": {"name": "resnet20"}, "method": {"name": "vanilla"}}
    if teacher_epochs:
        teacher_cfg["train"] = {**recipe["train"], "epochs": teacher_epochs}
    # the teacher is reused when its resolved recipe is the same: its folder is named by a hash of it
    digest = hashlib.sha256(json.dumps(teacher_cfg, sort_keys=True).encode()).hexdigest()[:10]
    _write_yaml(out / "configs" / "teacher.yaml", teacher_cfg)
    pair = {**recipe, "model": {"name": "resnet8"}, "teacher": {"name": "resnet20"}}
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
    teacher_label = f"teacher-{digest}"
    runs = []
    for name in STUDENT_METHODS:
        cfg = {k: v for k, v in pair.items() if not (name == "vanilla" and k == "teacher")}
        _write_yaml(out / "configs" / f"{name}.yaml", {**cfg, "method": methods[name]})
        runs.append({"label": name, "config": f"configs/{name}.yaml",
                     "overrides": [] if name == "vanilla" else [f"teacher.checkpoint={{pre:{teacher_label}}}"]})
    _write_yaml(out / "sweep.yaml", {"out": str(out), "seeds": list(seeds),
                                     "pre": [{"label": teacher_label, "config": "configs/teacher.yaml"}],
                                     "runs": runs})
    print(f"letkd quickstart: Fashion-MNIST ({train_subset or 60000} training images, {epochs} epochs), "
          f"teacher resnet20 -> student resnet8 with {', '.join(STUDENT_METHODS)}; writing to {out}")
    run_sweep(out / "sweep.yaml")

    # evaluate every student from its checkpoint alone (no teacher), as a user would deploy it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from letkd import data as datamod

    rows = []
    test = None
    teacher_summary = json.loads((out / teacher_label / "summary.json").read_text())
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
    lines = [f"teacher resnet20: {teacher_summary['last_acc']:.2f} % "
             f"({teacher_summary['params_student']:,} parameters)", "",
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
