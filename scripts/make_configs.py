"""Write the per-pair experiment configs (CIFAR-100, Tiny-ImageNet, ImageNet) from one table.

Run from the repository root: ``python scripts/make_configs.py``. The files it writes are
committed; edit this script (not the files) to change a recipe for every pair at once.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from letkd.methods.dkd import DKD_BETA_PER_PAIR
from letkd.methods.reviewkd import REVIEWKD_WEIGHT_PER_PAIR

ROOT = Path(__file__).resolve().parents[1] / "configs"
LOW_LR = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}  # METHOD.md §4: lr 0.01 for these students

CIFAR_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
               ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
               ("wrn_40_2", "ShuffleV1"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
               ("ResNet50", "MobileNetV2")]
TINY_PAIRS = [("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("wrn_40_2", "wrn_40_1"),
              ("resnet32x4", "resnet8x4"), ("ResNet50", "MobileNetV2")]
BASELINES = ["vanilla", "kd", "fitnet", "at", "sp", "pkt", "rkd", "vid", "crd", "dkd", "reviewkd", "simkd"]
# METHOD.md §4: alpha (inter, penult); (1, 1) unless listed
ALPHA = {"cifar100": {("ResNet50", "MobileNetV2"): (0.2, 0.1)},
         "tiny_imagenet": {("ResNet50", "MobileNetV2"): (1.0, 0.5)}}

# ImageNet KD / DKD: mdistiller configs/imagenet/{r34_r18,r50_mv2}/{kd,dkd}.yaml (commit e8c5bb3).
# KD: TEMPERATURE 1, CE_WEIGHT 0.5, KD_WEIGHT 0.5 (both pairs). DKD: T 1.0, WARMUP 1, CE_WEIGHT 1.0,
# BETA 0.5 (r34_r18) / 2.0 (r50_mv2); ALPHA is not set there, so mdistiller's default CFG.DKD.ALPHA 1.0.
IMAGENET_KD = {"T": 1.0, "ce_weight": 0.5, "weight": 0.5}
IMAGENET_DKD = {"alpha": 1.0, "T": 1.0, "warmup": 1, "ce_weight": 1.0}  # beta: next line
IMAGENET_DKD_BETA = {("resnet34", "resnet18"): 0.5, ("resnet50", "mobilenet_v2"): 2.0}

# K-means sample caps (method.max_samples; 0 = every location). Uncapped, the codebook K-means holds
# every training location (teacher map pooled to the student's H x W) in memory as float32:
# rows x C_teacher x 4 bytes. Only the K-means inputs are sampled; the LDA statistics, prototypes
# and S are streamed over every image whatever the cap (docs/method.md).
LETKD_METHODS = ("letkd1", "letkd2", "quest")
# ImageNet: 1.28M x 7x7 = 63M rows, ~129 GB (resnet34, 512 ch) / ~514 GB (resnet50, 2048 ch);
# capped: 4M rows, ~8 GB / ~33 GB. Our choice; the paper does not say how many it clustered.
IMAGENET_MAX_SAMPLES = 4_000_000
# Tiny-ImageNet: 100,000 training images; per pair (student penultimate H*W, teacher penultimate
# channels). Uncapped: 25.6M rows x 128 ch = 13.1 GB (wrn_40_2), x 64 = 6.6 GB (resnet56),
# x 256 = 26.2 GB (resnet32x4); 1.6M rows x 2048 ch = 13.1 GB (ResNet50 -> MobileNetV2, 4x4).
# All exceed the budget below, so each pair gets the largest cap (multiple of 100,000) under it.
TINY_TRAIN_IMAGES = 100_000
TINY_PENULT = {("wrn_40_2", "wrn_16_2"): (16 * 16, 128), ("resnet56", "resnet20"): (16 * 16, 64),
               ("wrn_40_2", "wrn_40_1"): (16 * 16, 128), ("resnet32x4", "resnet8x4"): (16 * 16, 256),
               ("ResNet50", "MobileNetV2"): (4 * 4, 2048)}
KMEANS_SAMPLE_BUDGET_BYTES = 4e9


def tiny_max_samples(teacher: str, student: str) -> int:
    """Largest multiple of 100,000 rows whose float32 K-means sample fits the budget (0: uncapped fits)."""
    hw, channels = TINY_PENULT[(teacher, student)]
    if TINY_TRAIN_IMAGES * hw * channels * 4 <= KMEANS_SAMPLE_BUDGET_BYTES:
        return 0
    return int(KMEANS_SAMPLE_BUDGET_BYTES // (channels * 4) // 100_000 * 100_000)


def max_samples_note(rows: int, channels: int, cap: int) -> str:
    return (f"K-means sample cap, for bounded memory: codebook sample of {cap:,} of {rows:,} rows x "
            f"{channels} ch float32 = {cap * channels * 4 / 1e9:.1f} GB instead of "
            f"{rows * channels * 4 / 1e9:.1f} GB (sub-class K-means: cap / num_classes rows per class). "
            f"Only the K-means inputs are sampled; the streaming statistics (LDA, prototypes, S) still "
            f"use all images. Set the same value on fit-targets and distill (part of the targets' key).")


def method_section(method: str, teacher: str, student: str, dataset: str) -> dict:
    m: dict = {"name": method}
    if method == "dkd" and dataset == "cifar100":
        m["beta"] = DKD_BETA_PER_PAIR.get((teacher, student), 8.0)
    if method == "reviewkd" and dataset == "cifar100":
        m["weight"] = REVIEWKD_WEIGHT_PER_PAIR.get((teacher, student), 5.0)
    if teacher == "ResNet50" and method in ("at", "vid", "reviewkd"):
        m["taps"] = ["stage2", "stage3", "stage4"]  # the 4-stage teacher's last three stages vs MobileNetV2's
    if method in ("letkd1", "letkd2", "quest"):
        a_inter, a_penult = ALPHA.get(dataset, {}).get((teacher, student), (1.0, 1.0))
        if method != "quest":
            m["alpha_penult"] = a_penult
        if method == "letkd2":
            m["alpha_inter"] = a_inter
    return m


def write(path: Path, doc: dict, comment: str, notes: dict[str, str] | None = None) -> None:
    """Write ``doc`` as YAML; ``notes`` maps a key to a comment written (wrapped) above its line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in yaml.safe_dump(doc, sort_keys=False).splitlines():
        key = line.strip().split(":", 1)[0]
        if notes and key in notes:
            indent = line[:len(line) - len(line.lstrip())]
            lines += [f"{indent}# {part}" for part in textwrap.wrap(notes[key], 96 - len(indent))]
        lines.append(line)
    path.write_text(f"# {comment}\n# generated by scripts/make_configs.py\n" + "\n".join(lines) + "\n")


def small_dataset(dataset: str, pairs: list[tuple[str, str]], teacher_ckpt: str) -> None:
    for teacher, student in pairs:
        pair_dir = ROOT / dataset / f"{teacher}_{student}"
        base = {"inherit": "../_recipe.yaml", "model": {"name": student},
                "teacher": {"name": teacher, "checkpoint": teacher_ckpt.format(t=teacher)}}
        if student in LOW_LR:
            base["train"] = {"lr": 0.01}
        write(pair_dir / "_pair.yaml", base, f"{dataset}: {teacher} -> {student} (METHOD.md §4 recipe)")
        for method in [*BASELINES, "quest", "letkd1", "letkd2"]:
            m = method_section(method, teacher, student, dataset)
            notes = None
            if dataset == "tiny_imagenet" and method in LETKD_METHODS and tiny_max_samples(teacher, student):
                hw, channels = TINY_PENULT[(teacher, student)]
                m["max_samples"] = tiny_max_samples(teacher, student)
                notes = {"max_samples": max_samples_note(TINY_TRAIN_IMAGES * hw, channels, m["max_samples"])}
            write(pair_dir / f"{method}.yaml", {"inherit": "_pair.yaml", "method": m},
                  f"{dataset}: {method}, {teacher} -> {student}", notes)
        write(pair_dir / "crd_kd.yaml", {"inherit": "_pair.yaml", "method": {
            "name": "combo", "parts": [{"name": "crd", "weight": 0.8}, {"name": "kd", "weight": 0.9}]}},
            f"{dataset}: CRD+KD as in the CRD paper, {teacher} -> {student}")


def main() -> None:
    small_dataset("cifar100", CIFAR_PAIRS, "teachers/cifar100/{t}_vanilla/ckpt_epoch_240.pth")
    small_dataset("tiny_imagenet", TINY_PAIRS, "runs/tiny_imagenet/teachers/{t}/checkpoints/best.pt")
    for teacher in sorted({t for t, _ in TINY_PAIRS}):
        write(ROOT / "tiny_imagenet" / "teachers" / f"{teacher}.yaml",
              {"inherit": "../_recipe.yaml", "model": {"name": teacher}, "method": {"name": "vanilla"},
               "run": {"dir": f"runs/tiny_imagenet/teachers/{teacher}"}},
              f"Tiny-ImageNet teacher {teacher} (the paper trains its own; same recipe)")
    for teacher, student, weights, channels in (("resnet34", "resnet18", "ResNet34_Weights.IMAGENET1K_V1", 512),
                                                ("resnet50", "mobilenet_v2", "ResNet50_Weights.IMAGENET1K_V1", 2048)):
        pair_dir = ROOT / "imagenet" / f"{teacher}_{student}"
        write(pair_dir / "_pair.yaml", {"inherit": "../_recipe.yaml", "model": {"name": student},
                                        "teacher": {"name": teacher, "pretrained": weights}},
              f"ImageNet: torchvision {teacher} ({weights}) -> {student}")
        for method in ("vanilla", "kd", "dkd", "crd", "quest", "letkd1", "letkd2"):
            m = method_section(method, teacher, student, "imagenet")
            notes = None
            if method == "crd":
                m["memory"] = "queue"  # a 1.28M-entry bank per view is impractical; see docs/methods.md
            if method == "kd":
                m.update(IMAGENET_KD)
                notes = {"T": "mdistiller configs/imagenet (KD): TEMPERATURE 1, CE_WEIGHT 0.5, KD_WEIGHT 0.5"}
            if method == "dkd":
                m.update(IMAGENET_DKD)
                m["beta"] = IMAGENET_DKD_BETA[(teacher, student)]
                notes = {"alpha": "mdistiller configs/imagenet (DKD): T 1.0, WARMUP 1, CE_WEIGHT 1.0, BETA 0.5 "
                                  "(r34_r18) / 2.0 (r50_mv2); ALPHA: mdistiller's default 1.0"}
            if method in LETKD_METHODS:
                m["max_samples"] = IMAGENET_MAX_SAMPLES
                notes = {"max_samples": max_samples_note(1_281_167 * 7 * 7, channels, IMAGENET_MAX_SAMPLES)}
            write(pair_dir / f"{method}.yaml", {"inherit": "_pair.yaml", "method": m},
                  f"ImageNet: {method}, {teacher} -> {student}", notes)


if __name__ == "__main__":
    main()
