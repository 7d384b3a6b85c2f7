"""Smoke tests of the benchmark scripts on a tiny pair: they run, and write the documented fields.
(The numbers they measure are committed results, never asserted here.)"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def _run(script: str, *args: str, timeout: int = 300) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=timeout)


def test_throughput_script(tmp_path) -> None:
    out = tmp_path / "tp.json"
    _run("throughput.py", "--pair", "resnet20:resnet8", "--methods", "kd", "letkd2", "--precisions", "fp32",
         "--batch", "4", "--steps", "1", "--warmup", "0", "--k-penult", "16", "--num-classes", "10",
         "--device", "cpu", "--out", str(out))
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["kd", "letkd2"]
    for r in rows:
        assert {"method", "teacher", "student", "precision", "device", "batch", "images_per_second"} <= set(r)
        assert r["teacher"] == "resnet20" and r["student"] == "resnet8" and r["batch"] == 4
        assert r["images_per_second"] > 0
    assert "| kd |" in out.with_suffix(".md").read_text()


def test_eval_cost_script(tmp_path) -> None:
    out = tmp_path / "ev.json"
    _run("eval_cost.py", "--pair", "resnet20:resnet8", "--methods", "letkd2", "quest", "--k-penult", "16",
         "--batch", "4", "--reps", "1", "--out", str(out))
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["letkd2", "quest"]
    for r in rows:
        assert r["reference_img_s"] > 0 and r["scoreless_img_s"] > 0 and r["plain_student_img_s"] > 0
        assert r["max_abs_logit_diff"] < 1e-4                      # both paths give the same logits
    assert "| quest |" in out.with_suffix(".md").read_text()


def test_letkd_cost_script(tmp_path) -> None:
    out = tmp_path / "cost.json"
    _run("letkd_cost.py", "--pairs", "resnet20:resnet8", "--batch", "4", "--k-penult", "16", "--num-classes", "10",
         "--steps", "1", "--warmup", "1", "--profile", "--memory", "--memory-batches", "4", "--tile-rows", "5",
         "--out", str(out), timeout=600)
    (row,) = json.loads(out.read_text())
    # both KD-layer kernels side by side, and the memory of a step for KD and each kernel
    assert row["kd_step_s"] > 0 and row["letkd2_step_s"] > 0 and row["fused_letkd2_step_s"] > 0
    assert {"fused_ratio", "fused_measured_slowdown", "measured_slowdown"} <= set(row)
    assert [(m["method"], m["kernel"], m["batch"]) for m in row["memory"]] == [
        ("kd", None, 4), ("letkd2", "reference", 4), ("letkd2", "fused", 4)]
    assert all(m["step_peak_mib"] >= 0 and m["saved_for_backward_mib"] > 0 for m in row["memory"])
    md = out.with_suffix(".md").read_text()
    assert "letKD-2 fused" in md and "| resnet20→resnet8 | 4 |" in md
    assert row["extra_gmacs"] > 0 and row["kd_step_gmacs"] > row["extra_gmacs"]
    assert row["predicted_extra_s"] > 0 and "ratio" in row
    # extra MACs = KD layers (forward + backward) + targets; both parts are counted
    assert abs(row["extra_gmacs"] - row["extra_kd_layers_gmacs"] - row["extra_targets_gmacs"]) < 1e-9
    # --profile: top operators and the matmul / element-wise / other split, for both methods
    for name in ("letkd2", "fused", "kd"):
        assert row[f"profile_{name}"] and {"op", "self_ms", "calls"} <= set(row[f"profile_{name}"][0])
        assert set(row[f"breakdown_{name}"]) == {"wide_matmul_ms", "wide_elementwise_ms", "wide_elementwise_calls",
                                                 "other_ms"}
    assert row["breakdown_letkd2"]["wide_elementwise_calls"] > 0 and row["breakdown_kd"]["wide_elementwise_calls"] == 0


def test_protocol_p_report_on_fabricated_runs(tmp_path) -> None:
    """benchmarks/protocol_p.py: mean ± sample std over finished seeds, running seeds listed and
    not used, the verdict's one-std comparison, per-epoch means — against numbers worked by hand."""
    def run(label: str, seed: int, accs: list[float], done: bool = True) -> None:
        d = tmp_path / "sweep" / label / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "lr": 0.05, "test_acc": a,
                                                             "train_acc": a + 2.0 + seed, "test_loss": 0.25})
                                                 + "\n" for i, a in enumerate(accs)))
        if done:
            (d / "summary.json").write_text(json.dumps({"best_acc": max(accs), "last_acc": accs[-1],
                                                        "wall_seconds": 600.0, "threads": 1, "cpu": "X"}))

    run("kd", 0, [80.0, 90.0]), run("kd", 1, [82.0, 88.0])                     # last 90, 88: 89.00 ± 1.41
    run("letkd2", 0, [81.0, 91.0]), run("letkd2", 1, [83.0, 93.0])             # last 91, 93: 92.00 ± 1.41
    run("letkd2", 2, [70.0], done=False)
    out = tmp_path / "p.md"
    _run("protocol_p.py", str(tmp_path / "sweep"), "--out", str(out))
    text = out.read_text()
    assert "| KD | 2 | 89.00 ± 1.41 | 89.00 ± 1.41 | s0: 90.00, s1: 88.00 | 10 min | 1 × X | – |" in text
    assert "| letKD-2 | 2 | 92.00 ± 1.41 | 92.00 ± 1.41 |" in text and "s2 at epoch 1" in text
    assert ("letKD-2 92.00 is ahead of KD 89.00 by 3.00 points at the last epoch (n = 2 / 2); "
            "the gap exceeds one std (1.41).") in text
    assert "letKD-2 vs letKD-1: not yet measured (2 and 0 finished seeds)." in text
    # fit table: train acc = last test acc + 2 + seed -> KD 92, 91 (91.50 ± 0.71); train − test 91.5 − 89 = 2.50
    assert "| KD | 2 | 91.50 ± 0.71 | 0.250 ± 0.000 | 89.00 ± 1.41 | 2.50 |" in text
    assert "| 1 | 0.05 | 81.00 | 82.00 |" in text and "| 2 | 0.05 | 89.00 | 92.00 |" in text
