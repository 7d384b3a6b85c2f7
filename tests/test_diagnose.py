"""`letkd diagnose`: the student's decisions vs the teacher's on a tiny real letKD-2 run, checked
against an independent computation (teacher features by a plain forward hook, codebook targets from
explicit squared distances, α = 0 by hand)."""
import json

import pytest
import torch

from conftest import ROOT, TINY, letkd_inproc, needs_fmnist

pytestmark = needs_fmnist
PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"


@pytest.fixture(scope="module")
def tiny_letkd2_run(tmp_path_factory):
    from letkd import models

    tmp = tmp_path_factory.mktemp("diag")
    torch.manual_seed(0)
    teacher = models.create("resnet8", num_classes=10, in_channels=1)
    torch.save({"model": teacher.state_dict()}, tmp / "teacher.pt")
    run = tmp / "run"
    letkd_inproc("distill", PAIR / "letkd2.yaml", *TINY, "train.epochs=1", "teacher.name=resnet8",
                 f"teacher.checkpoint={tmp / 'teacher.pt'}", "method.k_penult=16", "method.max_samples=0",
                 f"method.targets_dir={tmp / 'targets'}", f"run.dir={run}")
    return tmp, run


def test_diagnose_matches_an_independent_computation(tiny_letkd2_run):
    from letkd import data as datamod
    from letkd import models
    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import evaluate, rebuild_deployable
    from letkd.targets.artifact import load_targets

    tmp, run = tiny_letkd2_run
    out = tmp / "diag_out"
    rc, stdout, _ = letkd_inproc("diagnose", run, "--out", out)
    d = json.loads((out / "decisions.json").read_text())
    assert "| penult | 16 |" in stdout and (out / "decisions.md").is_file()

    # the student rebuilt alone, its test set, the teacher and the targets artifact, independently
    ck = load_file(run / "checkpoints" / "best.pt")
    model, cfg, _ = rebuild_deployable(ck, "cpu")
    data = datamod.build(cfg.data, batch_size=60, test_batch_size=100, device="cpu")
    teacher = models.create("resnet8", num_classes=10, in_channels=1, checkpoint=tmp / "teacher.pt").eval()
    (artifact,) = (tmp / "targets").glob("*.pt")
    targets = load_targets(artifact)
    rho = targets["penult"]["centroids"].float()
    feats = {}
    module = dict(teacher.named_modules())[models.TAPS["resnet8"]["penultimate"]]
    module.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    layer = model.kd_layers.penult
    agree = n = 0
    entropy = 0.0
    won, targeted = set(), set()
    with torch.no_grad():
        for b in data.test_batches():
            teacher(b["images"])
            model(b["images"])
            t = feats["t"].permute(0, 2, 3, 1).reshape(-1, rho.shape[1])
            p = torch.softmax(-cfg.method["tau"] * torch.cdist(t, rho) ** 2, dim=1)
            a = layer.last_scores.permute(0, 2, 3, 1).reshape(-1, 16)
            agree += int((a.argmax(1) == p.argmax(1)).sum())
            n += a.shape[0]
            entropy -= float((p * torch.log(p.clamp_min(1e-30))).sum())
            won |= set(a.argmax(1).tolist())
            targeted |= set(p.argmax(1).tolist())
    pen = d["layers"]["penult"]
    assert pen["locations"] == n == 200 * 8 * 8
    assert pen["agreement"] == pytest.approx(agree / n, abs=2e-3)   # argmax ties aside
    assert pen["target_entropy"] == pytest.approx(entropy / n, rel=1e-3)
    assert pen["templates_won"] == len(won) and pen["templates_targeted"] == len(targeted)
    inter = d["layers"]["inter"]
    assert inter["num_templates"] == 80
    assert inter["s_diagonal_mass"] == pytest.approx(float(torch.diagonal(targets["inter"]["S"]).mean()), rel=1e-6)
    assert 0.0 <= inter["winner_class_is_label"] <= 1.0 and 0 < inter["templates_won"] <= 80

    # accuracy as trained = `letkd evaluate`; α = 0 at test time, by hand
    assert d["acc"] == pytest.approx(evaluate(model, data.test_batches(), torch.device("cpu"))["acc"], abs=1e-9)
    layer.alpha = 0.0
    assert pen["acc_alpha0"] == pytest.approx(evaluate(model, data.test_batches(), torch.device("cpu"))["acc"], abs=1e-9)
    model.kd_layers.inter.alpha = 0.0
    assert d["acc_alpha0_all"] == pytest.approx(evaluate(model, data.test_batches(), torch.device("cpu"))["acc"], abs=1e-9)


def test_diagnose_refuses_a_run_without_kd_layers(tmp_path):
    from letkd.report.decisions import diagnose_run

    run = tmp_path / "v"
    letkd_inproc("train-teacher", ROOT / "configs" / "fashion_mnist" / "resnet8.yaml", *TINY, "train.epochs=1",
                 f"run.dir={run}")
    with pytest.raises(ValueError, match="no KD layers"):
        diagnose_run(run)
