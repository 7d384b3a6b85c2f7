"""torchvision:/timm: models by name, taps resolved without a table, --import of the user's own
models, and one distillation step of catalogue models through `letkd distill` on an image folder."""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import letkd.models as M
from conftest import letkd_inproc
from letkd.models import catalog
from letkd.models.autotaps import TapResolutionError, auto_taps
from letkd.models.taps import capture, feature_shapes, resolve

SMALL_VIT = dict(patch_size=4, depth=3, embed_dim=48, num_heads=3)


# ------------------------------------------------------------------------------------------ names
def test_catalogue_models_by_name():
    for name in ("timm:resnet18", "torchvision:shufflenet_v2_x0_5"):
        m = M.create(name, num_classes=7, in_channels=1).eval()
        with torch.no_grad():
            assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
        assert m.letkd_arch == name and m.letkd_taps == {}
    assert M.create("torchvision:resnet18", num_classes=3).letkd_taps == M.TAPS["resnet18"]  # the zoo's table
    vit = M.create("timm:vit_tiny_patch16_224", num_classes=5, image_size=32, **SMALL_VIT)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 5) and vit.letkd_input_shape == (3, 32, 32)
    with pytest.raises(M.UnknownModelError, match="Did you mean timm:resnet50"):
        M.create("timm:resnet5")
    with pytest.raises(M.UnknownModelError, match="torchvision:resnet50"):
        M.create("torchvision:resnet5")
    with pytest.raises(ValueError, match="resnet50.a1_in1k"):
        M.create("timm:resnet50.nope")
    with pytest.raises(M.UnknownModelError, match="--import MODULE"):
        M.create("my_own_net")


def test_missing_timm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(catalog.MissingExtraError, match=r"pip install letkd\[timm\]"):
        M.create("timm:resnet18")
    assert all(not n.startswith("timm:") for n in catalog.list_names("*:resnet18"))


def test_listing_patterns():
    names = catalog.list_names("timm:convnext_at*")
    assert "timm:convnext_atto" in names and all(n.startswith("timm:convnext_at") for n in names)
    assert "timm:convnext_atto.d2_in1k" in catalog.list_names("timm:convnext_atto.*")
    everything = catalog.list_names(registry=M.names())
    assert {"resnet8x4", "torchvision:shufflenet_v2_x0_5", "timm:resnet18"} <= set(everything)
    _, out, _ = letkd_inproc("models", "timm:convnext_at*")
    assert "timm:convnext_atto" in out.split() and "resnet8x4" not in out.split()
    _, out, _ = letkd_inproc("models", "--all")
    assert {"resnet8x4", "torchvision:vit_b_16", "timm:deit_tiny_patch16_224"} <= set(out.split())


# ------------------------------------------------------------------------------------ pretrained
def test_pretrained_from_a_local_file(tmp_path):
    """The library's own loader reads the published file (here: random weights saved like one)."""
    name, file = "timm:mobilenetv3_small_050", str(tmp_path / "published.pth")
    ref = M.create(name, num_classes=1000)
    torch.save(ref.state_dict(), file)
    got = M.create(name, num_classes=1000, pretrained=file)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.warns(UserWarning, match="classifier is newly initialised for num_classes=10"):
        head = M.create(name, num_classes=10, pretrained=file)
    assert torch.equal(head.conv_head.weight, ref.conv_head.weight) and head.classifier.out_features == 10
    # torchvision: the published file is a plain state_dict, read with weights_only=True
    tv = M.create("torchvision:shufflenet_v2_x0_5", num_classes=1000)
    torch.save(tv.state_dict(), tmp_path / "shufflenet.pth")
    tv2 = M.create("torchvision:shufflenet_v2_x0_5", num_classes=1000, pretrained=str(tmp_path / "shufflenet.pth"))
    assert all(torch.equal(v, tv2.state_dict()[k]) for k, v in tv.state_dict().items())
    with pytest.raises(ValueError, match="num_classes=1000"):
        M.create("torchvision:shufflenet_v2_x0_5", num_classes=10, pretrained=str(tmp_path / "shufflenet.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.create(name, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="'default'"):
        M.create(name, pretrained="IMAGENET1K_V1")
    assert catalog._torchvision_weights_name("resnet50", "default") == "ResNet50_Weights.DEFAULT"
    assert catalog._torchvision_weights_name("resnet50", "IMAGENET1K_V2") == "ResNet50_Weights.IMAGENET1K_V2"


def test_teacher_with_a_new_classifier_is_refused(tmp_path):
    file = tmp_path / "published.pth"
    torch.save(M.create("timm:mobilenetv3_small_050", num_classes=1000).state_dict(), file)
    tr, te = write_image_folder(tmp_path / "data")
    cfg = write_config(tmp_path / "c.yaml", tr, te, "resnet8", "timm:mobilenetv3_small_050", "kd",
                       teacher_keys={"pretrained": str(file)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = letkd_inproc("distill", cfg, f"run.dir={tmp_path / 'run'}", check=False)
    assert rc == 2 and "classifier would be untrained (3 classes here)" in err and "teacher.checkpoint" in err


def test_pretrained_without_internet_says_what_to_do(monkeypatch):
    timm = catalog.require_timm()

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="timm/resnet18.a1_in1k.*set pretrained to its path"):
        M.create("timm:resnet18", pretrained="default")


# ------------------------------------------------------------------------------------ auto taps
AUTO = {  # model -> expected (penultimate, last_stage_first_block, penultimate C×H×W) at 32×32
    "timm:resnet18": ("layer4.1", "layer4.0", (512, 1, 1)),
    "timm:convnext_atto": ("stages.3.blocks.1", "stages.3.blocks.0", (320, 1, 1)),
    "timm:efficientnet_b0": ("bn2", "blocks.5.0", (1280, 1, 1)),
    # the head reads the class token: the last block's patch tokens never reach it
    "timm:vit_tiny_patch16_224": ("blocks.1", "blocks.0", (48, 8, 8)),
}


@pytest.mark.parametrize("name", list(AUTO))
def test_auto_taps_families(name):
    kw = SMALL_VIT if "vit" in name else {}
    m = M.create(name, num_classes=10, image_size=32, **kw)
    penult, first, shape = AUTO[name]
    assert resolve(m, "penultimate", name) == penult and resolve(m, "last_stage_first_block", name) == first
    assert feature_shapes(m, {"p": penult}, (3, 32, 32))["p"] == shape
    top = next(iter(dict(m.named_children())))
    assert resolve(m, top, name) == top  # a module path overrides


def test_auto_taps_vit_average_pooling_uses_the_last_block():
    m = M.create("timm:vit_tiny_patch16_224", num_classes=10, image_size=32, global_pool="avg", **SMALL_VIT)
    assert auto_taps(m, (3, 32, 32))["penultimate"] == "blocks.2"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_auto_taps_agree_with_the_hand_written_tables(name):
    """Independent check: the automatic taps capture the same tensors as the zoo's tables."""
    m = M.create(name, num_classes=10).eval()
    auto = auto_taps(m, (3, 64, 64))
    table = M.TAPS[name]
    paths = {**{f"auto_{k}": v for k, v in auto.items()}, **{k: table[k] for k in auto}}
    with torch.no_grad(), capture(m, paths) as cap:
        m(torch.randn(2, 3, 64, 64))
        for k in auto:
            assert torch.equal(cap[f"auto_{k}"], cap[k]), (k, auto[k], table[k])


def test_auto_taps_errors_list_candidates():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(TapResolutionError, match="no module outputs a B×C×H×W map"):
        resolve(mlp, "penultimate", input_shape=(3, 2, 2))
    flat = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))
    assert resolve(flat, "penultimate", input_shape=(3, 8, 8)) == "1"  # the ReLU feeds the pool
    with pytest.raises(TapResolutionError, match=r"last_stage_first_block.*candidate module paths: 1 \(8, 8, 8\)"):
        resolve(flat, "last_stage_first_block", input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="no input shape"):
        resolve(nn.Sequential(nn.Conv2d(3, 8, 1)), "penultimate")
    flat.output_fmt = "NHWC"  # as timm's Swin: feature maps B×H×W×C
    with pytest.raises(TapResolutionError, match="channels-last"):
        auto_taps(flat, (3, 8, 8))


def test_letkd_taps_command_prints_the_resolved_taps():
    _, out, _ = letkd_inproc("taps", "timm:resnet50")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert rows == {"penultimate": "layer4.2", "last_stage_first_block": "layer4.0"}
    assert out.count("(auto") == 2


# ------------------------------------------------------------------------------------ --import
USER_MODULE = '''
from torch import nn
import letkd.models

def tiny_cnn(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

letkd.models.register("{name}", tiny_cnn, taps={{"penultimate": "2"}}, overwrite=True)
'''


def write_image_folder(root, classes=("a", "b", "c"), train=4, test=2, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):  # class-dependent brightness: something to learn
                img = np.clip(rng.normal(60 + 60 * k, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root / "train", root / "test"


def write_config(path, train_dir, test_dir, student, teacher, method, teacher_keys=None, method_keys=None):
    cfg = {"data": {"name": "image_folder", "train_dir": str(train_dir), "test_dir": str(test_dir),
                    "image_size": 32, "augment": "none"},
           "model": {"name": student}, "teacher": {"name": teacher, **(teacher_keys or {})},
           "method": {"name": method, **(method_keys or {})},
           "train": {"epochs": 1, "batch_size": 12, "test_batch_size": 6, "lr": 0.01, "precision": "fp32",
                     "progress": False, "milestones": [5], "device": "cpu"},
           "run": {"tensorboard": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_import_registers_a_model_that_a_config_uses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_models.py").write_text(USER_MODULE.format(name="my_tiny_cnn"))
    # a module whose import would leave a mark: a config naming it must not import it
    (tmp_path / "marker_models.py").write_text("open('IMPORTED', 'w').close()\n")
    tr, te = write_image_folder(tmp_path / "data")
    cfg = write_config(tmp_path / "c.yaml", tr, te, "my_tiny_cnn", "", "vanilla")
    try:
        rc, _, err = letkd_inproc("train-teacher", cfg, f"run.dir={tmp_path / 'r0'}", check=False)
        assert rc == 2 and "unknown model 'my_tiny_cnn'" in err and "--import" in err
        letkd_inproc("train-teacher", cfg, f"run.dir={tmp_path / 'r1'}", "--import", "my_models")
        s = json.loads((tmp_path / "r1" / "summary.json").read_text())
        assert s["student"] == "my_tiny_cnn" and s["epochs"] == 1
        rc, _, err = letkd_inproc("train-teacher", cfg, "model.name=marker_models", f"run.dir={tmp_path / 'r2'}",
                                  check=False)
        assert rc == 2 and "unknown model 'marker_models'" in err and not (tmp_path / "IMPORTED").exists()
        rc, _, err = letkd_inproc("train-teacher", cfg, "--import", "no_such_pkg.models", check=False)
        assert rc == 2 and "no module named 'no_such_pkg'" in err
    finally:
        M.REGISTRY.pop("my_tiny_cnn", None)
        M.TAPS.pop("my_tiny_cnn", None)
        sys.modules.pop("my_models", None)


# ------------------------------------------------------------------------ distil catalogue models
PAIRS = [("timm:mobilenetv3_small_050", "torchvision:shufflenet_v2_x0_5"),
         ("torchvision:shufflenet_v2_x0_5", "timm:mobilenetv3_small_050")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    tr, te = write_image_folder(root / "data")
    teachers = {}
    for _, teacher in PAIRS:  # random weights stand in for a trained teacher
        teachers[teacher] = root / f"{teacher.replace(':', '_')}.pt"
        torch.save({"model": M.create(teacher, num_classes=3, image_size=32).state_dict()}, teachers[teacher])
    return root, tr, te, teachers


@pytest.mark.parametrize("method", ["kd", "letkd2"])
@pytest.mark.parametrize("student,teacher", PAIRS)
def test_distill_catalogue_models_one_step(student, teacher, method, folder, tmp_path):
    root, tr, te, teachers = folder
    keys = {"k_penult": 8, "k_sub": 2, "targets_dir": str(tmp_path)} if method == "letkd2" else {}
    cfg = write_config(tmp_path / "c.yaml", tr, te, student, teacher, method,
                       teacher_keys={"checkpoint": str(teachers[teacher])}, method_keys=keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        letkd_inproc("distill", cfg, f"run.dir={tmp_path / 'run'}")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["student"], s["teacher"], s["method"], s["epochs"]) == (student, teacher, method, 1)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    losses = {k for k in row if k.startswith("loss_")}
    assert losses == ({"loss_ce", "loss_kd"} if method == "kd" else {"loss_ce", "loss_penult", "loss_inter"})
    assert all(np.isfinite(row[k]) for k in losses)
    if method == "letkd2":
        assert s["params_extra"] > 0
