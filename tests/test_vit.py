"""The KD layer on vision transformers: patch tokens as locations (letkd.models.tokens), letKD-2,
KD and FitNet on small random-weight timm ViT/DeiT models (32×32 images, 4×4 patches), and the
student with its KD layers through `letkd distill --import` and `letkd export` (onnxruntime)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import letkd.models as M
from conftest import letkd_inproc
from letkd import methods
from letkd.methods import Context
from letkd.models.attach import KDLayerSpec, attach_kd_layers
from letkd.models.tokens import TokenLayout, layout_of, to_map, to_tokens
from test_catalog import write_config, write_image_folder

STUDENT = ("timm:deit_tiny_distilled_patch16_224", dict(patch_size=4, depth=2, embed_dim=48, num_heads=3))
TEACHER = ("timm:vit_tiny_patch16_224", dict(patch_size=4, depth=3, embed_dim=64, num_heads=4))


def vit(which, num_classes=4):
    name, kw = which
    return M.create(name, num_classes=num_classes, image_size=32, **kw)


def test_token_layouts_and_maps():
    assert layout_of(vit(STUDENT)) == TokenLayout(2, (8, 8))  # class + distillation tokens
    assert layout_of(vit(TEACHER)).prefix == 1
    assert layout_of(M.create("resnet8")) is None
    layout = TokenLayout(1, (2, 3))
    x = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(2, 7, 4)  # B=2, 1 + 2·3 tokens, C=4
    fmap, prefix = to_map(x, layout)
    assert fmap.shape == (2, 4, 2, 3) and torch.equal(prefix, x[:, :1])
    for i in range(2):
        for j in range(3):  # patch (i, j) is token 1 + 3i + j
            assert torch.equal(fmap[:, :, i, j], x[:, 1 + 3 * i + j])
    assert torch.equal(to_tokens(fmap, prefix), x)
    assert not layout.is_tokens(torch.zeros(2, 6, 4)) and TokenLayout(0).grid_for(16) == (4, 4)


def test_kd_layer_on_tokens_is_written_back():
    torch.manual_seed(0)
    model = vit(STUDENT).eval()
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    h = model.blocks[1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("before", out.clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    layers = attach_kd_layers(model, None, {"penult": KDLayerSpec("blocks.1", 5)}, input_shape=(3, 32, 32))
    assert layers["penult"].channels == 48
    model.blocks[1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("after", out))
    with torch.no_grad():
        model(x)
        tokens = seen["before"]
        patches = tokens[:, 2:].reshape(3, 8, 8, 48).permute(0, 3, 1, 2)  # row-major patch grid
        want, scores = layers["penult"](patches)
    after = seen["after"]
    assert after.shape == tokens.shape and torch.equal(after[:, :2], tokens[:, :2])  # prefix tokens untouched
    torch.testing.assert_close(after[:, 2:], want.permute(0, 2, 3, 1).reshape(3, 64, 48))
    assert layers["penult"].last_scores.shape == scores.shape == (3, 5, 8, 8)


class RandomData:
    """What ``prepare`` needs: ``info`` and un-augmented batches."""

    class info:
        name, num_train = "random", 32

    def plain_train_batches(self, batch_size):
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            yield {"images": torch.randn(16, 3, 32, 32, generator=g), "labels": torch.arange(16) % 4,
                   "index": torch.arange(16) + 16 * i}


@pytest.mark.parametrize("method,params", [
    ("letkd2", {"k_penult": 8, "k_sub": 2, "teacher_inter_tap": "blocks.2"}),  # a module path overrides
    ("kd", {}),
    ("fitnet", {"tap": "blocks.0", "teacher_tap": "blocks.1"}),
])
def test_methods_on_vit_pair(method, params, tmp_path):
    torch.manual_seed(0)
    student, teacher = vit(STUDENT), vit(TEACHER)
    ctx = Context(num_classes=4, image_size=(32, 32), student_arch=STUDENT[0], teacher_arch=TEACHER[0])
    if method == "letkd2":
        params = {**params, "targets": str(tmp_path / "targets.pt")}
    d = methods.create(method, student, teacher, ctx, params)
    d.prepare(RandomData())
    if method == "letkd2":
        # tiny DeiT (class pooling, 2 blocks): both layers on blocks.0, inter first (METHOD §2)
        assert d.s_paths == {"inter": "blocks.0", "penult": "blocks.0"}
        assert d.t_paths == {"inter": "blocks.2", "penult": "blocks.1"} and d.t_channels["penult"] == 64
    logits, losses = d.forward_train(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)
    assert logits.shape == (8, 4) and all(torch.isfinite(v) for v in losses.values())
    assert set(losses) == {"letkd2": {"ce", "penult", "inter"}, "kd": {"ce", "kd"}, "fitnet": {"ce", "feat"}}[method]
    sum(losses.values()).backward()
    own = {"letkd2": "kd_layers", "fitnet": "regressor"}.get(method)
    for p in (d.student.kd_layers if own == "kd_layers" else getattr(d, own or "student")).parameters():
        assert not p.requires_grad or (p.grad is not None and torch.isfinite(p.grad).all())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.blocks[0].parameters())


USER_VITS = '''
import timm
import letkd.models

def tiny_deit(num_classes=10, in_channels=3, image_size=(32, 32)):
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=num_classes, in_chans=in_channels,
                             img_size=image_size, patch_size=4, depth=2, embed_dim=48, num_heads=3)

def tiny_vit(num_classes=10, in_channels=3, image_size=(32, 32)):
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, in_chans=in_channels,
                             img_size=image_size, patch_size=4, depth=3, embed_dim=64, num_heads=4)

letkd.models.register("user_tiny_deit", tiny_deit, overwrite=True)
letkd.models.register("user_tiny_vit", tiny_vit, overwrite=True)
'''


def test_vit_student_distilled_and_exported_with_its_kd_layers(tmp_path, monkeypatch):
    """`--import` registers the ViTs; letKD-2 through `letkd distill`; ONNX checked by onnxruntime."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "user_vits.py").write_text(USER_VITS)
    tr, te = write_image_folder(tmp_path / "data", classes=("a", "b"), train=6, test=2)
    try:
        from letkd.models.user import import_modules

        import_modules([str(tmp_path / "user_vits.py")])
        teacher = tmp_path / "teacher.pt"
        torch.save({"model": M.create("user_tiny_vit", num_classes=2, image_size=(32, 32)).state_dict()}, teacher)
        cfg = write_config(tmp_path / "c.yaml", tr, te, "user_tiny_deit", "user_tiny_vit", "letkd2",
                           teacher_keys={"checkpoint": str(teacher)},
                           method_keys={"k_penult": 8, "k_sub": 2, "targets_dir": str(tmp_path)})
        run = tmp_path / "run"
        letkd_inproc("distill", cfg, f"run.dir={run}", "--import", str(tmp_path / "user_vits.py"))
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert {"loss_ce", "loss_penult", "loss_inter"} <= set(row)
        _, out, _ = letkd_inproc("export", run / "checkpoints" / "last.pt", "-o", tmp_path / "s.onnx",
                                 "--import", str(tmp_path / "user_vits.py"))
        rep = json.loads(out)
        assert rep["max_abs_diff"] < 1e-4
        # the exported student holds both KD layers (C = 48; K_penult = 8, K_inter = 2 sub-classes · 2 classes)
        bare = sum(p.numel() for p in M.create("user_tiny_deit", num_classes=2, image_size=(32, 32)).parameters())
        assert rep["params"] - bare == (2 * 48 * 8 + 2 * 8 + 2) + (2 * 48 * 4 + 2 * 4 + 2)
    finally:
        for n in ("user_tiny_deit", "user_tiny_vit"):
            M.REGISTRY.pop(n, None)
            M.TAPS.pop(n, None)
        sys.modules.pop("letkd_user_user_vits", None)
