"""KDLayer (METHOD §1) against a per-location reference, gradients, parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from letkd.layers import CosineConv1x1, KDLayer, kd_layer_extra_params


def reference_kd_layer(layer: KDLayer, x: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Explicit per-location loops in float64 (METHOD §1 steps 1-4)."""
    W = layer.templates.weight.detach().double().numpy()[:, :, 0, 0]     # K×C
    V = layer.values.weight.detach().double().numpy()[:, :, 0, 0]        # C×K
    s1, s2 = layer.templates.scale.item(), layer.values.scale.item()
    g, b = layer.bn.weight.detach().double().numpy(), layer.bn.bias.detach().double().numpy()
    B, C, H, Wd = x.shape
    K = W.shape[0]
    a = np.zeros((B, K, H, Wd))
    for n in range(B):
        for i in range(H):
            for j in range(Wd):
                xi = x[n, :, i, j]
                for k in range(K):
                    a[n, k, i, j] = s1 * xi @ W[k] / (max(np.linalg.norm(xi), 1e-12) * max(np.linalg.norm(W[k]), 1e-12))
    if train:
        mu = a.mean(axis=(0, 2, 3))
        var = a.var(axis=(0, 2, 3))  # biased, as BN normalises with
    else:
        mu = layer.bn.running_mean.double().numpy()
        var = layer.bn.running_var.double().numpy()
    out = np.zeros_like(x)
    for n in range(B):
        for i in range(H):
            for j in range(Wd):
                bn = (a[n, :, i, j] - mu) / np.sqrt(var + layer.bn.eps) * g + b
                p = np.maximum(bn, 0.0)
                p = p / max(np.linalg.norm(p), 1e-12)
                v = np.array([s2 * (V[c] / np.linalg.norm(V[c])) @ p for c in range(C)])
                out[n, :, i, j] = x[n, :, i, j] + layer.alpha * v
    return out, a


@pytest.mark.parametrize("train", [True, False])
def test_kd_layer_matches_reference(train: bool) -> None:
    from test_fused_step import make_layer

    layer = make_layer(6, 5, alpha=0.7, seed=0)   # non-trivial scales and BN state
    x = torch.randn(2, 6, 3, 4)
    layer.train(train)
    running_before = layer.bn.running_mean.clone()
    ref_out, ref_a = reference_kd_layer(layer, x.double().numpy(), train)
    x_hat, a = layer(x)
    assert x_hat.shape == x.shape and a.shape == (2, 5, 3, 4)
    np.testing.assert_allclose(a.detach().numpy(), ref_a, atol=1e-5)
    np.testing.assert_allclose(x_hat.detach().numpy(), ref_out, atol=1e-5)
    assert layer.last_scores is a
    assert a.requires_grad  # not detached
    if train:
        assert not torch.equal(running_before, layer.bn.running_mean)


def test_zero_location_gives_finite_values() -> None:
    layer = KDLayer(4, 3)
    x = torch.randn(2, 4, 2, 2)
    x[0, :, 0, 0] = 0
    x.requires_grad_(True)
    x_hat, a = layer(x)
    (x_hat.sum() + a.sum()).backward()
    assert torch.isfinite(x_hat).all() and torch.isfinite(x.grad).all()


def test_gradcheck_float64() -> None:
    torch.manual_seed(1)
    layer = KDLayer(3, 4, alpha=1.0).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x, w1, s1, w2, s2, g, b):
        return layer(x)

    params = [layer.templates.weight, layer.templates.scale, layer.values.weight, layer.values.scale,
              layer.bn.weight, layer.bn.bias]
    with torch.no_grad():  # avoid ReLU kinks at 0 being hit exactly
        layer.bn.bias.fill_(0.1)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *params), eps=1e-6, atol=1e-5)


def test_parameter_count_names_and_init() -> None:
    torch.manual_seed(0)
    C, K = 64, 512
    layer = KDLayer(C, K)
    n = sum(p.numel() for p in layer.parameters())
    assert n == 2 * C * K + 2 * K + 2 == kd_layer_extra_params(C, K)
    names = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert names["templates.weight"] == (K, C, 1, 1) and names["values.weight"] == (C, K, 1, 1)
    assert names["templates.scale"] == () and names["values.scale"] == ()
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= set(names)
    assert float(layer.templates.scale) == 3.0 and float(layer.values.scale) == 1.0
    w, v = layer.templates.weight, layer.values.weight
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - math.sqrt(2 / C)) < 0.01 * math.sqrt(2 / C) * 5
    assert abs(v.std().item() - math.sqrt(2 / K)) < 0.05 * math.sqrt(2 / K)


def test_cosine_conv_is_cosine() -> None:
    conv = CosineConv1x1(4, 3, init_scale=2.0)
    x = torch.randn(1, 4, 1, 1)
    out = conv(x)[0, :, 0, 0]
    ref = 2.0 * torch.nn.functional.cosine_similarity(x[0, :, 0, 0][None], conv.weight[:, :, 0, 0], dim=1)
    torch.testing.assert_close(out, ref)


def test_alpha_zero_is_identity() -> None:
    layer = KDLayer(4, 6, alpha=0.0)
    x = torch.randn(2, 4, 3, 3)
    x_hat, a = layer(x)
    assert torch.equal(x_hat, x) and a.shape == (2, 6, 3, 3)


def test_normalised_rows_matmul_matches_autograd() -> None:
    """The hand-written backward of step 3 against autograd of the plain composition, including
    an all-zero row (ReLU can zero every template: ‖p‖ < eps branch)."""
    from letkd.layers import normalised_rows_matmul
    torch.manual_seed(3)
    p = torch.rand(7, 5, dtype=torch.float64)
    p[2] = 0.0
    w = torch.randn(3, 5, dtype=torch.float64)
    p1, w1 = p.clone().requires_grad_(True), w.clone().requires_grad_(True)
    p2, w2 = p.clone().requires_grad_(True), w.clone().requires_grad_(True)
    g = torch.randn(7, 3, dtype=torch.float64)
    (normalised_rows_matmul(p1, w1) * g).sum().backward()
    (F.normalize(p2, dim=1) @ w2.t() * g).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    q = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: normalised_rows_matmul(a, b), (q, v))
