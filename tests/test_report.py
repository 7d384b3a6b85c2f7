"""`letkd report`: curves, the sweep comparison chart and KD-layer template maps.

The letKD-2 run is fabricated (its checkpoint holds an untrained student rebuilt by the trainer's
own ``build_distiller``), so no teacher needs training: what is tested is the report, not training.
"""
import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, TINY, letkd, needs_fmnist
from letkd.report import ReportError, make_report
from letkd.report.templates import argmax_map, majority, template_classes, upsample_nearest

PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"


def _valid_png(p):
    assert p.is_file() and p.stat().st_size > 0, p
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


# -- unit tests --------------------------------------------------------------------------------
def test_template_to_class_mapping_matches_decisions():
    """Template j of the intermediate layer is sub-class (c, k) with j = c·k_sub + k (the flat
    index of letkd.targets.decisions), so its class is j // k_sub."""
    from letkd.targets.decisions import assign_subclasses

    k_sub, nc = 8, 10
    j = torch.arange(k_sub * nc)
    assert torch.equal(template_classes(j, k_sub), torch.arange(nc).repeat_interleave(k_sub))
    assert template_classes(17, 8) == 2 and template_classes(np.array([0, 7, 8, 79]), 8).tolist() == [0, 0, 1, 9]
    # the decisions module's flat index c·k_sub + k* maps back to the label c
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(nc, k_sub, 3, generator=g)
    y = torch.randint(0, nc, (50,), generator=g)
    flat = assign_subclasses(torch.randn(50, 3, generator=g), y, centres)
    assert torch.equal(template_classes(flat, k_sub), y)
    with pytest.raises(ValueError):
        template_classes(3, 0)


def test_argmax_map_on_hand_built_scores():
    s = torch.zeros(2, 5, 2, 3)
    s[0, 4, 0, 0] = 1.0      # template 4 wins at (0,0)
    s[0, 1, 1, 2] = 2.0      # template 1 at (1,2); elsewhere all-equal -> first index (0)
    s[1, 3] = 0.5            # image 1: template 3 everywhere ...
    s[1, 2, 0, 1] = 0.7      # ... except template 2 at (0,1)
    m = argmax_map(s)
    assert m.shape == (2, 2, 3) and m.dtype == torch.long
    assert m[0].tolist() == [[4, 0, 0], [0, 0, 1]]
    assert m[1].tolist() == [[3, 2, 3], [3, 3, 3]]
    # intermediate layer with k_sub = 2: classes of those templates
    assert template_classes(m[0], 2).tolist() == [[2, 0, 0], [0, 0, 0]]
    assert majority(m[1].numpy()) == (3, 5 / 6)
    up = upsample_nearest(m, (4, 6))
    assert up.shape == (2, 4, 6) and torch.equal(up[:, ::2, ::2], m) and torch.equal(up[:, 1::2, 1::2], m)
    with pytest.raises(ValueError):
        argmax_map(torch.zeros(3, 4))


# -- sweep: fabricated run directories ------------------------------------------------------------
def _fake_run(d, accs, method, losses=("ce", "penult")):
    d.mkdir(parents=True)
    rows = []
    for e, a in enumerate(accs, 1):
        r = {"epoch": e, "lr": 0.05, "train_acc": a + 3, "test_acc": a}
        for i, k in enumerate(losses):
            r[f"loss_{k}"] = 2.0 / e + i
        r["loss"] = sum(v for k, v in r.items() if k.startswith("loss_"))
        rows.append(r)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "summary.json").write_text(json.dumps({"method": method, "student": "resnet8", "best_acc": max(accs),
                                                "last_acc": accs[-1], "epochs": len(accs)}))
    (d / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}}))


def test_sweep_report_curves_and_comparison(tmp_path):
    root = tmp_path / "sweep"
    _fake_run(root / "vanilla" / "seed0", [50, 60, 58], "vanilla", ("ce",))
    _fake_run(root / "vanilla" / "seed1", [52, 62, 61], "vanilla", ("ce",))
    _fake_run(root / "letkd2" / "seed0", [55, 66, 65], "letkd2", ("ce", "penult", "inter"))
    _fake_run(root / "letkd2" / "seed1", [57, 70, 69], "letkd2", ("ce", "penult", "inter"))
    with open(root / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "method"], ["vanilla", "vanilla"], ["letkd2", "letkd2"]])
    msgs = []
    written = make_report(root, log=msgs.append)   # no checkpoints: curves only, messages say so
    out = root / "report"
    for name in ("sweep_test_acc.png", "comparison.png", "runs/letkd2_seed1/accuracy.png",
                 "runs/letkd2_seed1/losses.png", "runs/vanilla_seed0/losses.png"):
        assert out / name in written
        _valid_png(out / name)
    assert (out / "index.md").is_file() and "comparison.png" in (out / "index.md").read_text()
    stats = {r["label"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    assert list(stats) == ["vanilla", "letkd2"]          # results.csv order
    assert float(stats["letkd2"]["best_mean"]) == pytest.approx(68.0)
    assert float(stats["letkd2"]["best_std"]) == pytest.approx(np.std([66, 70], ddof=1))
    assert float(stats["vanilla"]["last_mean"]) == pytest.approx(59.5) and stats["vanilla"]["n"] == "2"
    assert any("no KD layers" in m and "vanilla" in m for m in msgs)
    assert any("no checkpoint" in m for m in msgs)      # letkd2 runs without checkpoints


def test_missing_metrics_and_empty_dirs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "vanilla"}}))
    msgs = []
    with pytest.raises(ReportError, match="nothing to report"):
        make_report(run, log=msgs.append)
    assert any("no metrics.jsonl" in m for m in msgs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="neither a run directory"):
        make_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "nope")
    p = letkd("report", tmp_path / "empty", check=False)
    assert p.returncode == 2 and "neither a run directory" in p.stderr


# -- a letKD-2 run with a checkpoint: template maps through the CLI --------------------------------
@needs_fmnist
def test_letkd2_run_report_with_template_maps(tmp_path):
    from letkd import config
    from letkd import data as datamod
    from letkd.engine import dist
    from letkd.engine.trainer import build_distiller

    run = tmp_path / "l2"
    cfg = config.load(PAIR / "letkd2.yaml", [*TINY, "teacher.name=resnet8", "method.k_penult=64",
                                            "teacher.checkpoint=", f"run.dir={run}"])
    data = datamod.build(cfg.data, batch_size=60, test_batch_size=100)
    i = data.info
    info = {"name": i.name, "num_classes": i.num_classes, "in_channels": i.in_channels,
            "image_size": list(i.image_size), "num_train": i.num_train, "mean": list(i.mean), "std": list(i.std)}
    distiller, _, _ = build_distiller(cfg, info, torch.device("cpu"), dist.DistInfo(), with_teacher_weights=False)
    model = distiller.deployable()
    assert {"inter", "penult"} <= {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if "kd_layers." in n}
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "config": config.to_dict(cfg), "data_info": info,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               run / "checkpoints" / "best.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    _fake_run(run / "_m", [20.0, 30.0], "letkd2", ("ce", "penult", "inter"))
    for f in ("metrics.jsonl", "summary.json"):
        (run / "_m" / f).rename(run / f)
    (run / "_m" / "config.yaml").unlink()
    (run / "_m").rmdir()

    out = tmp_path / "rep"
    p = letkd("report", run, "--out", out, "--images", "6")
    listed = p.stdout.split()
    for name in ("accuracy.png", "losses.png", "template_maps_inter.png", "template_maps_penult.png"):
        assert str(out / name) in listed
        _valid_png(out / name)
    side = json.loads((out / "template_maps.json").read_text())
    inter, penult = side["layers"]["inter"], side["layers"]["penult"]
    assert inter["num_templates"] == 80 and inter["k_sub"] == 8 and penult["num_templates"] == 64
    assert len(inter["images"]) == 6 and side["class_names"][0] == "T-shirt/top"
    for im in inter["images"]:
        t = np.array(im["templates"])
        assert t.shape == (8, 8) and np.array_equal(np.array(im["classes"]), t // 8)
        assert im["majority_name"] == side["class_names"][im["majority_class"]]
    # the labels are the first test images in order
    first = next(iter(data.test_batches()))["labels"][:6].tolist()
    assert [im["true"] for im in inter["images"]] == first
