"""Every method through `letkd distill` on a Fashion-MNIST subset, and the letKD student
evaluated and exported without its teacher.

What each check means, on any CPU (issue 15): every method's run completes, every logged loss
is finite and the task loss falls over two tiny epochs of 15 steps. The test accuracy of so short
a run is not asserted: it can sit at chance for a method that is learning, because the BatchNorm
running statistics used at evaluation lag behind weights that move fast in the first steps
(FitNet's hint term, weighted 100, moves them most; docs/methods.md), and CPU kernels tip it
either way. Methods that must learn (KD, FitNet, letKD-2) run for 60 steps, the last 30 at a
tenth of the learning rate so that those statistics settle, and must beat chance (10 %) by a
wide margin.
"""
import json
import math
import warnings

import pytest

from conftest import ROOT, TINY, letkd, letkd_inproc, needs_fmnist
from letkd.engine.checkpoint import load_file

pytestmark = needs_fmnist
PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"
METHODS = ["vanilla", "kd", "fitnet", "at", "sp", "pkt", "rkd", "vid", "crd", "dkd", "reviewkd", "simkd",
           "quest", "letkd1", "letkd2"]
# a small teacher keeps the suite fast; the shipped configs use resnet20
SMALL = ["teacher.name=resnet8", "train.epochs=1"]
# two epochs of 15 steps (300 images, batch 20): enough for the task loss to fall clearly
TWO_EPOCHS = ["data.train_subset=300", "train.batch_size=20", "train.epochs=2"]
# methods that must learn: 2 × 30 steps, the second epoch at lr × 0.1. Measured on a 2-core AMD EPYC with
# ATEN_CPU_CAPABILITY=avx2 / =default: KD 42.5 / 38.5 %, FitNet 48.5 / 49.0 %, letKD-2 56.5 / 57.0 %
# (after the first 30 steps FitNet is at 28.5 / 13.5 %: the knife-edge this schedule avoids)
LEARNERS = {"kd", "fitnet", "letkd2"}
ENOUGH_STEPS = ["data.train_subset=600", "train.batch_size=20", "train.epochs=2", "train.milestones=[1]"]
BEATS_CHANCE = 25.0  # % on the 200 test images; chance is 10 %
PER_METHOD = {"crd": ["method.nce_k=256"], "letkd1": ["method.k_penult=64", "method.max_samples=0"],
              "letkd2": ["method.k_penult=64", "method.max_samples=0"],
              "quest": ["method.k_penult=64", "method.max_samples=0"]}
TASK_LOSS = {"simkd": "loss_feat"}  # SimKD trains its student through the teacher's classifier (ce_weight 0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "t"
    letkd_inproc("train-teacher", ROOT / "configs" / "fashion_mnist" / "resnet8.yaml", *TINY, "train.epochs=2",
                 f"run.dir={run}")
    return run / "checkpoints" / "best.pt"


def _distill(method, teacher, tmp_path, *extra):
    run = tmp_path / method
    letkd_inproc("distill", PAIR / f"{method}.yaml", *TINY, *SMALL, f"teacher.checkpoint={teacher}", f"run.dir={run}",
                 f"method.targets_dir={tmp_path}" if method in ("quest", "letkd1", "letkd2") else "train.seed=0",
                 *PER_METHOD.get(method, []), *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), rows


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_its_loss_falls(method, teacher, tmp_path):
    s, rows = _distill(method, teacher, tmp_path, *(ENOUGH_STEPS if method in LEARNERS else TWO_EPOCHS))
    assert s["method"] == method and s["epochs"] == 2 and [r["epoch"] for r in rows] == [1, 2]
    losses = {k: [r[k] for r in rows] for k in rows[0] if k.startswith("loss")}
    assert "loss_ce" in losses and (method == "vanilla" or set(losses) - {"loss", "loss_ce"}), losses
    assert all(math.isfinite(v) for values in losses.values() for v in values), losses
    task = losses[TASK_LOSS.get(method, "loss_ce")]
    assert task[1] < 0.95 * task[0], (method, losses)  # measured: falls by 15-30 % (noise ≈ 2 %)
    assert s["last_acc"] == rows[-1]["test_acc"] and 0.0 <= s["last_acc"] <= 100.0
    assert math.isfinite(rows[-1]["test_loss"])
    if method in LEARNERS:
        assert s["last_acc"] >= BEATS_CHANCE, (method, rows)


def test_letkd2_params_extra_evaluate_export(teacher, tmp_path):
    run = tmp_path / "l2"
    letkd_inproc("distill", PAIR / "letkd2.yaml", *TINY, *SMALL, f"teacher.checkpoint={teacher}", f"run.dir={run}",
                 f"method.targets_dir={tmp_path}", *PER_METHOD["letkd2"])
    s = json.loads((run / "summary.json").read_text())
    # resnet8: both KD layers on 64-channel maps; K_penult = 64, K_inter = 8 * 10 = 80
    assert s["params_extra"] == (2 * 64 * 64 + 2 * 64 + 2) + (2 * 64 * 80 + 2 * 80 + 2)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_ce", "loss_penult", "loss_inter"} <= set(row)
    ck = load_file(run / "checkpoints" / "last.pt")
    assert any(k.startswith("kd_layers.") for k in ck["model"])
    ev = json.loads(letkd("evaluate", run / "checkpoints" / "last.pt", "teacher.checkpoint=/nonexistent").stdout)
    assert abs(ev["acc"] - s["last_acc"]) < 1e-6
    # export: torch.export-based exporter (no deprecation warning from torch.onnx), KD layers in the
    # graph, dynamic batch, checked against onnxruntime at another batch size than the example's
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("error", category=category, module=r"torch\.onnx")
            warnings.filterwarnings("error", category=category, message=r".*onnx")
        _, stdout, _ = letkd_inproc("export", run / "checkpoints" / "last.pt", "-o", tmp_path / "s.onnx")
    rep = json.loads(stdout)
    assert rep["max_abs_diff"] < 1e-4 and rep["method"] == "letkd2"
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(tmp_path / "s.onnx"))
    names = {t.name for t in m.graph.initializer}  # (the exporter folds some weights into unnamed constants)
    for layer in ("kd_layers.penult.", "kd_layers.inter."):
        assert any(n.startswith(layer) for n in names), (layer, sorted(names))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    assert {p.key for p in m.metadata_props} >= {"letkd_mean", "letkd_std", "letkd_method"}
    # the cached targets are reused (no refit) by a second run and by fit-targets
    _, stdout, _ = letkd_inproc("fit-targets", PAIR / "letkd2.yaml", *TINY, *SMALL, f"teacher.checkpoint={teacher}",
                                f"method.targets_dir={tmp_path}", *PER_METHOD["letkd2"])
    out = json.loads(stdout)
    assert out["targets"].startswith(str(tmp_path)) and out["seconds"] < 30
