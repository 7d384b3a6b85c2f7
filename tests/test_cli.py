"""End-to-end: the letkd command on small real data (Fashion-MNIST subsets)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, TINY, letkd, letkd_inproc, needs_fmnist
from letkd.engine.checkpoint import load_file

pytestmark = needs_fmnist
CFG = ROOT / "configs" / "fashion_mnist" / "resnet8.yaml"


def _files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())


def test_train_teacher_run_directory_and_evaluate(tmp_path):
    run = tmp_path / "t"
    p = letkd("train-teacher", CFG, *TINY, "train.epochs=2", f"run.dir={run}", "run.tensorboard=true")
    out = json.loads(p.stdout[p.stdout.index("{"):])
    files = _files(run)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert f in files
    assert any(f.startswith("tb/events") for f in files)
    summary = json.loads((run / "summary.json").read_text())
    for k in ("method", "teacher", "student", "dataset", "seed", "epochs", "best_acc", "last_acc", "best_epoch",
              "params_student", "params_extra", "wall_seconds", "images_per_second"):
        assert k in summary
    assert summary["student"] == "resnet8" and summary["params_extra"] == 0 and summary["epochs"] == 2
    # 10 classes: well above chance (10 %) after 2 tiny epochs; measured 43.0 % (avx2) and 39.5 % (default kernels)
    assert summary["best_acc"] == out["best_acc"] >= 25
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("loss_ce" in r and "test_acc" in r for r in rows)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    ck = load_file(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config", "version"} <= set(ck)
    # evaluate rebuilds the student from the checkpoint's config alone
    ev = json.loads(letkd("evaluate", run / "checkpoints" / "last.pt").stdout)
    assert abs(ev["acc"] - summary["last_acc"]) < 1e-6 and ev["count"] == 200


def test_existing_run_dir_is_protected(tmp_path):
    run = tmp_path / "t"
    letkd("train-teacher", CFG, *TINY, "train.epochs=1", f"run.dir={run}")
    p = letkd("train-teacher", CFG, *TINY, "train.epochs=1", f"run.dir={run}", check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume" in p.stderr
    p = letkd("train-teacher", CFG, *TINY, "train.epochs=1", "train.lr=0.2", f"run.dir={run}", "--resume", check=False)
    assert p.returncode == 2 and "train.lr" in p.stderr
    letkd("train-teacher", CFG, *TINY, "train.epochs=1", f"run.dir={run}", "--overwrite")


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "letkd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_is_exact(tmp_path):
    args = ["train-teacher", CFG, *TINY, "train.epochs=3", "data.train_subset=1200"]
    ref = tmp_path / "ref"
    letkd(*args, f"run.dir={ref}")
    run = tmp_path / "killed"
    proc = _start([*args, f"run.dir={run}"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            time.sleep(0.3)  # into the middle of epoch 2
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    letkd(*args, f"run.dir={run}", "--resume")
    a = load_file(ref / "checkpoints" / "last.pt")
    b = load_file(run / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["test_acc"] for r in ra] == [r["test_acc"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_export_onnx_plain_student(tmp_path):
    run = tmp_path / "t"
    letkd("train-teacher", CFG, *TINY, "train.epochs=1", f"run.dir={run}")
    out = tmp_path / "m.onnx"
    _, stdout, _ = letkd_inproc("export", run / "checkpoints" / "best.pt", "--format", "onnx", "-o", out)
    rep = json.loads(stdout)
    assert out.exists() and rep["max_abs_diff"] < 1e-4 and rep["input_shape"][0] == "batch"


def test_cli_listing():
    assert "resnet8x4" in letkd("models").stdout.split()
    assert "vanilla" in letkd("methods").stdout.split()
    p = letkd("taps", "resnet20")
    assert "penultimate" in p.stdout and "layer3" in p.stdout
