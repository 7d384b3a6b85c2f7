"""Attaching KD layers to a student (METHOD §2): forward, state_dict, order, reload, ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from letkd.export import to_onnx
from letkd.models.attach import KDLayerSpec, attach_kd_layers


class ToyCNN(nn.Module):
    """3 stages; the last stage has two blocks (``stage3.0``, ``stage3.1``)."""

    def __init__(self, num_classes: int = 5, width: int = 8, in_ch: int = 3) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))


def _attached(seed: int = 0) -> tuple[ToyCNN, dict]:
    torch.manual_seed(seed)
    m = ToyCNN()
    layers = attach_kd_layers(m, None, {"inter": KDLayerSpec("stage3.0", 10, 1.0),
                                        "penult": KDLayerSpec("stage3", 12, 0.5)}, input_shape=(3, 16, 16))
    return m, layers


def test_attach_runs_in_forward_and_state_dict() -> None:
    m, layers = _attached()
    assert layers["inter"].channels == 16 and layers["penult"].num_templates == 12
    assert any(k.startswith("kd_layers.inter.templates.weight") for k in m.state_dict())
    x = torch.randn(3, 3, 16, 16)
    m.train()
    out = m(x)
    assert out.shape == (3, 5)
    assert layers["inter"].last_scores.shape == (3, 10, 4, 4)
    assert layers["penult"].last_scores.shape == (3, 12, 4, 4)
    # the output differs from the same network without KD layers
    plain = ToyCNN()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("kd_layers")})
    plain.train()
    assert not torch.allclose(plain(x), out)


def test_coinciding_taps_apply_in_order() -> None:
    torch.manual_seed(0)
    m = ToyCNN()
    order = []
    layers = attach_kd_layers(m, None, {"inter": KDLayerSpec("stage3", 4), "penult": KDLayerSpec("stage3", 5)},
                              input_shape=(3, 16, 16))
    for name, layer in layers.items():
        layer.register_forward_hook(lambda *_a, _n=name: order.append(_n))
    m(torch.randn(2, 3, 16, 16))
    assert order == ["inter", "penult"]


def test_rebuild_and_load_gives_identical_outputs() -> None:
    m, _ = _attached(0)
    m.train()
    m(torch.randn(4, 3, 16, 16))  # move BN running stats
    m.eval()
    m2, _ = _attached(1)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m(x), m2(x), rtol=0, atol=0)


def test_onnx_export_matches_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    m, _ = _attached(0)
    m.train()
    m(torch.randn(4, 3, 16, 16))
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    path = to_onnx(m, x, tmp_path / "m.onnx")  # letkd export's path: the torch.export-based exporter
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 3, 16, 16)
    got = sess.run(None, {"images": x2.numpy()})[0]
    with torch.no_grad():
        ref = m(x2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
