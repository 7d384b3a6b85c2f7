"""Every method through `letkd distill` for one epoch on a Fashion-MNIST subset, and the letKD
student evaluated and exported without its teacher."""
import json

import pytest

from conftest import ROOT, TINY, letkd, letkd_inproc, needs_fmnist
from letkd.engine.checkpoint import load_file

pytestmark = needs_fmnist
PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"
METHODS = ["vanilla", "kd", "fitnet", "at", "sp", "pkt", "rkd", "vid", "crd", "dkd", "reviewkd", "simkd",
           "quest", "letkd1", "letkd2"]
# a small teacher keeps the suite fast; the shipped configs use resnet20
SMALL = ["teacher.name=resnet8", "train.epochs=1"]
PER_METHOD = {"crd": ["method.nce_k=256"], "letkd1": ["method.k_penult=64", "method.max_samples=0"],
              "letkd2": ["method.k_penult=64", "method.max_samples=0"],
              "quest": ["method.k_penult=64", "method.max_samples=0"]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "t"
    letkd_inproc("train-teacher", ROOT / "configs" / "fashion_mnist" / "resnet8.yaml", *TINY, "train.epochs=2",
                 f"run.dir={run}")
    return run / "checkpoints" / "best.pt"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_one_epoch(method, teacher, tmp_path):
    run = tmp_path / method
    letkd_inproc("distill", PAIR / f"{method}.yaml", *TINY, *SMALL, f"teacher.checkpoint={teacher}", f"run.dir={run}",
          f"method.targets_dir={tmp_path}" if method in ("quest", "letkd1", "letkd2") else "train.seed=0",
          *PER_METHOD.get(method, []))
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == method and s["epochs"] == 1 and s["last_acc"] > 10.0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss_ce" in row or method == "simkd"


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
    rep = json.loads(letkd("export", run / "checkpoints" / "last.pt", "-o", tmp_path / "s.onnx").stdout)
    assert rep["max_abs_diff"] < 1e-4
    # the cached targets are reused (no refit) by a second run and by fit-targets
    _, stdout, _ = letkd_inproc("fit-targets", PAIR / "letkd2.yaml", *TINY, *SMALL, f"teacher.checkpoint={teacher}",
                                f"method.targets_dir={tmp_path}", *PER_METHOD["letkd2"])
    out = json.loads(stdout)
    assert out["targets"].startswith(str(tmp_path)) and out["seconds"] < 30
