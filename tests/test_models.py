"""Model zoo: RepDistiller compatibility (keys, shapes, parameter counts), taps, weights I/O."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import letkd.models as M
from letkd.models import imagenet
from letkd.models.taps import get_module
from letkd.models.weights import fingerprint, load_weights

# Parameter counts of RepDistiller's models for num_classes=100 (from the task specification).
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860, "ResNet50": 23_705_252, "wrn_16_1": 180_916, "wrn_16_2": 703_284,
    "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg11": 9_277_284,
    "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692, "MobileNetV2": 812_836,
    "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
}
CIFAR = list(PARAMS)

# A few state_dict entries worked out by hand from RepDistiller's models/*.py
# (None: the key must NOT exist, e.g. an identity shortcut).
REPDISTILLER_KEYS = {
    "resnet8x4": {
        "conv1.weight": (32, 3, 3, 3), "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1), "layer3.0.downsample.0.weight": (256, 128, 1, 1),
        "layer3.0.downsample.1.running_mean": (256,), "fc.weight": (100, 256), "fc.bias": (100,),
        "layer1.1.conv1.weight": None,
    },
    "resnet20": {
        "layer1.0.downsample.0.weight": None, "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.2.bn2.num_batches_tracked": (), "fc.weight": (100, 64),
    },
    "ResNet50": {
        "conv1.weight": (64, 3, 3, 3), "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.1.shortcut.0.weight": None, "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
    "wrn_40_2": {
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block1.layer.1.convShortcut.weight": None,
        "block3.layer.5.conv2.weight": (128, 128, 3, 3), "block3.layer.0.bn1.weight": (64,),
        "bn1.weight": (128,), "fc.weight": (100, 128),
    },
    "vgg8": {
        "block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_var": (64,),
        "block4.0.weight": (512, 512, 3, 3), "classifier.weight": (100, 512),
    },
    "vgg13": {"block0.3.weight": (64, 64, 3, 3), "block4.4.weight": (512,), "block4.5.weight": None},
    "MobileNetV2": {
        "conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3), "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1), "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "ShuffleV1": {
        "conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv3.weight": (216, 18, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1),
        "linear.weight": (100, 960),
    },
    "ShuffleV2": {
        "layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.1.conv1.weight": (58, 58, 1, 1), "layer3.3.bn3.weight": (232,),
        "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024),
    },
}

# Penultimate spatial size at 32x32 input.
PENULT_HW = {**{n: 8 for n in CIFAR}, "ResNet50": 4, "vgg8": 4, "vgg11": 4, "vgg13": 4, "vgg16": 4,
             "vgg19": 4, "MobileNetV2": 2, "ShuffleV1": 4, "ShuffleV2": 4}


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {n: M.create(n).eval() for n in CIFAR}


def _classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def test_names_and_unknown_name():
    assert set(CIFAR) <= set(M.names())
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v2"} <= set(M.names())
    with pytest.raises(KeyError) as e:
        M.create("resnet21")
    assert "resnet20" in str(e.value) and "ShuffleV2" in str(e.value)


@pytest.mark.parametrize("name", CIFAR)
def test_parameter_count(zoo, name):
    assert sum(p.numel() for p in zoo[name].parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(REPDISTILLER_KEYS))
def test_repdistiller_keys(zoo, name):
    sd = zoo[name].state_dict()
    for key, shape in REPDISTILLER_KEYS[name].items():
        if shape is None:
            assert key not in sd, key
        else:
            assert key in sd, key
            assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("name", CIFAR)
def test_taps(zoo, name):
    """Every tap exists; penultimate feeds the pooling + classifier; intermediate taps are used;
    captured outputs are not modified in place afterwards."""
    model = zoo[name]
    taps = M.TAPS[name]
    assert {"penultimate", "last_stage_first_block", "stage1", "stage2", "stage3"} <= set(taps)
    assert model.letkd_taps == taps
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [get_module(model, p).register_forward_hook(
        lambda _m, _i, out, k=k: seen.__setitem__(k, (out, out.clone()))) for k, p in taps.items()]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    assert set(seen) == set(taps)
    for k, (out, copy) in seen.items():
        assert torch.equal(out, copy), f"{name}: tap {k} was modified in place after capture"
    fc = _classifier(model)
    with torch.no_grad():
        fc.bias.copy_(torch.randn_like(fc.bias))  # a non-zero bias makes "bias only" meaningful
        logits = model(x)
    c, h, w = seen["penultimate"][0].shape[1:]
    assert c == fc.in_features and h == w == PENULT_HW[name]

    def zero(_m, _i, out):
        return torch.zeros_like(out)

    for tap in ("penultimate", "last_stage_first_block"):
        handle = get_module(model, taps[tap]).register_forward_hook(zero)
        with torch.no_grad():
            y = model(x)
        handle.remove()
        assert not torch.equal(y, logits), f"{name}: replacing {tap} did not change the logits"
        if tap == "penultimate":
            torch.testing.assert_close(y, fc.bias.expand_as(y))


@pytest.mark.parametrize("name", ["resnet8", "ResNet50", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_in_channels_one(name):
    model = M.create(name, num_classes=10, in_channels=1).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_repdistiller_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = M.create("resnet8").eval()
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    path = _save({"model": src.state_dict(), "epoch": 240, "accuracy": torch.tensor(70.1),
                  "best_acc": 70.3, "optimizer": opt.state_dict()}, tmp_path / "ckpt_epoch_240.pth")
    dst = M.create("resnet8", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_plain_state_dict_ddp_prefix_and_letkd_checkpoint(tmp_path):
    src = M.create("wrn_16_1")
    sd = src.state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    for obj in (sd, ddp, {"model": ddp, "config": {"model": {"name": "wrn_16_1"}}, "version": "0.1.0"}):
        dst = M.create("wrn_16_1")
        load_weights(dst, _save(obj, tmp_path / "w.pt"), arch="wrn_16_1")
        assert fingerprint(dst) == fingerprint(src)


def test_missing_num_batches_tracked_is_tolerated():
    src = M.create("resnet8")
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = M.create("resnet8")
    load_weights(dst, {"model": sd})
    torch.testing.assert_close(dst.fc.weight, src.fc.weight)


def test_mismatch_other_architecture(tmp_path):
    path = _save({"model": M.create("resnet20").state_dict()}, tmp_path / "r20.pth")
    dst = M.create("resnet32")
    before = fingerprint(dst)
    with pytest.raises(ValueError) as e:
        load_weights(dst, path, arch="resnet32")
    msg = str(e.value)
    assert "missing keys" in msg and "layer1.3.conv1.weight" in msg and "architecture" in msg
    assert fingerprint(dst) == before  # untouched on failure


def test_mismatch_num_classes(tmp_path):
    path = _save({"model": M.create("resnet20", num_classes=10).state_dict()}, tmp_path / "r20c10.pth")
    with pytest.raises(ValueError) as e:
        load_weights(M.create("resnet20", num_classes=100), path)
    msg = str(e.value)
    assert "fc.weight expected (100, 64) found (10, 64)" in msg and "num_classes=10" in msg


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _save({"model": M.create("resnet8").state_dict(), "evil": _Evil(str(marker))}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError, match="pickled"):
        load_weights(M.create("resnet8"), path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match="neither a state_dict"):
        load_weights(M.create("resnet8"), _save({"epoch": 3, "lr": 0.1}, tmp_path / "x.pt"))
    with pytest.raises(FileNotFoundError):
        load_weights(M.create("resnet8"), tmp_path / "missing.pt")


def test_fingerprint():
    sd = M.create("resnet8").state_dict()
    fp = fingerprint(sd)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(dict(reversed(list(sd.items())))) == fp
    assert fingerprint({k: v.clone() for k, v in sd.items()}) == fp
    changed = {k: v.clone() for k, v in sd.items()}
    changed["fc.bias"][3] += 1e-3
    assert fingerprint(changed) != fp
    assert fingerprint({**sd, "fc.bias": sd["fc.bias"].double()}) != fp
    # independent reference for a tiny dict
    import hashlib

    t = torch.tensor([1.0, 2.0])
    ref = hashlib.sha256(b"a|(2,)|torch.float32|" + t.numpy().tobytes()).hexdigest()[:16]
    assert fingerprint({"a": t}) == ref


def test_register_user_model():
    def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, num_classes))

    M.register("_tiny_test", tiny, taps={"penultimate": "1"})
    try:
        model = M.create("_tiny_test", num_classes=5, in_channels=1)
        assert model(torch.randn(1, 1, 8, 8)).shape == (1, 5)
        assert M.TAPS["_tiny_test"]["penultimate"] == "1"
        with pytest.raises(ValueError, match="already registered"):
            M.register("_tiny_test", tiny)
    finally:
        M.REGISTRY.pop("_tiny_test", None)
        M.TAPS.pop("_tiny_test", None)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_imagenet_models(name):
    model = M.create(name, num_classes=7).eval()
    taps = M.TAPS[name]
    for path in taps.values():
        get_module(model, path)
    feats = {}
    h = get_module(model, taps["penultimate"]).register_forward_hook(lambda _m, _i, o: feats.setdefault("p", o))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    h.remove()
    assert feats["p"].shape[1] == _classifier(model).in_features
    grey = M.create(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 7)


def test_torchvision_weights_resolution():
    w = imagenet.resolve_weights("resnet34", "ResNet34_Weights.IMAGENET1K_V1")
    assert w.name == "IMAGENET1K_V1" and len(w.meta["categories"]) == 1000
    with pytest.raises(ValueError, match="ResNet34_Weights.IMAGENET1K_V1"):
        imagenet.resolve_weights("resnet34", "ResNet34_Weights.NOPE")
    with pytest.raises(ValueError, match="not for architecture"):
        imagenet.resolve_weights("resnet34", "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="1000 classes"):
        M.create("resnet34", num_classes=10, pretrained="ResNet34_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="ImageNet models"):
        M.create("resnet20", pretrained="ResNet34_Weights.IMAGENET1K_V1")
