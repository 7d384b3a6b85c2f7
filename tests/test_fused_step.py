"""The fused, tiled KD-layer training step (letkd.fused_step) against the reference path
(KDLayer.forward + template_kl_loss): outputs, loss, every gradient and BN running statistics.

Tolerances: fp32 — every output and gradient within 1e-4 relative (max-norm over the tensor;
plus 1e-6 absolute for gradients that vanish in exact arithmetic, e.g. s1's when batch-statistics
BN is the only consumer of the scores), running statistics within 1e-5. Autocast (bf16, fp16 on CPU) — matrix products in the low
precision, so both paths differ from fp32 by the rounding of their products; the fused path's
error against fp32 must be at most twice the reference path's own error plus 0.02 (bf16) /
0.005 (fp16), relative max-norm.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from letkd.fused_step import column_moments, fused_kd_step, row_tiles
from letkd.layers import KDLayer
from letkd.methods.letkd import template_kl_loss
from letkd.targets import DecisionTargetRows, SoftTargetRows, decision_targets, soft_targets


def rel(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> float:
    """max |a − b| / max(max |b|, atol / 1e-4): relative, with an absolute floor."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(b.abs().max().item(), atol / 1e-4)
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def make_layer(channels: int, k: int, alpha: float, seed: int = 1) -> KDLayer:
    torch.manual_seed(seed)
    layer = KDLayer(channels, k, alpha=alpha)
    with torch.no_grad():
        layer.templates.scale.fill_(2.5)
        layer.values.scale.fill_(1.3)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.3, 0.3)
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 2.0)
    return layer


def run_layer(layer: KDLayer, x0: torch.Tensor, targets: torch.Tensor | None, fused: bool, tile: int | None = 7,
              bn_train: bool = True, autocast: torch.dtype | None = None) -> dict:
    """One training-mode forward + backward of ``x̂·g + 3·KL`` (g fixed); returns outputs,
    loss, every gradient and BN's buffers."""
    layer.train()
    layer.bn.train(bn_train)
    x = x0.clone().requires_grad_(True)
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if fused:
            targets_for = (lambda hw: (lambda s, e: targets[s:e])) if targets is not None else None
            with layer.fused_step(targets_for, tile):
                x_hat, scores = layer(x)
            assert scores is None and layer.last_scores is None
            loss = layer.last_loss
        else:
            x_hat, scores = layer(x)
            loss = template_kl_loss(scores, targets) if targets is not None else None
        total = (x_hat.float() * g).sum() + (3.0 * loss if loss is not None else 0.0)
    total.backward()
    out = {"x_hat": x_hat.detach().float(), "grad.x": x.grad}
    if loss is not None:
        out["loss"] = loss.detach()
    out.update({f"grad.{n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    out.update({f"buf.{n}": b.clone() for n, b in layer.bn.named_buffers()})
    return out


def compare(ref: dict, got: dict, tol: float = 1e-4, buf_tol: float = 1e-5) -> None:
    assert set(ref) == set(got), (sorted(ref), sorted(got))
    for k in ref:
        if k.startswith("buf."):
            assert (ref[k].double() - got[k].double()).abs().max().item() <= buf_tol, k
        else:
            assert rel(got[k], ref[k], 1e-6) <= tol, (k, rel(got[k], ref[k]))


def soft(n: int, k: int, seed: int = 2) -> torch.Tensor:
    t = torch.softmax(2.0 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), 1)
    t[0] = 0.0
    t[0, 1] = 1.0   # a one-hot row: 0·log 0 terms
    return t


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("tile", [1, 7, 64, None])
def test_fused_matches_reference_fp32(alpha: float, tile: int | None) -> None:
    """N = 2·5·3 = 30 rows (not a multiple of 7 or 64), K = 13 (not a multiple of 8)."""
    x0 = torch.randn(2, 6, 5, 3, generator=torch.Generator().manual_seed(0))
    x0[0, :, 0, 0] = 0.0  # a zero location (normalisation eps branch)
    p = soft(30, 13)
    ref = run_layer(make_layer(6, 13, alpha), x0, p, fused=False)
    got = run_layer(make_layer(6, 13, alpha), x0, p, fused=True, tile=tile)
    compare(ref, got)
    if alpha == 0.0:
        assert not any(k.startswith(("grad.bn", "grad.values")) for k in got)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fused_without_targets_and_with_running_stats(alpha: float) -> None:
    """An unsupervised layer (values only), and BN with running statistics (BN in eval mode
    inside a training layer): no batch statistics, running buffers untouched."""
    x0 = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    compare(run_layer(make_layer(5, 11, alpha), x0, None, fused=False),
            run_layer(make_layer(5, 11, alpha), x0, None, fused=True, tile=10))
    p = soft(48, 11)
    ref = run_layer(make_layer(5, 11, alpha), x0, p, fused=False, bn_train=False)
    got = run_layer(make_layer(5, 11, alpha), x0, p, fused=True, tile=5, bn_train=False)
    compare(ref, got)
    fresh = make_layer(5, 11, alpha)
    assert torch.equal(got["buf.running_var"], fresh.bn.running_var)


def test_running_stats_follow_batchnorm_momentum_rules() -> None:
    """Several steps, then momentum=None (cumulative average): buffers equal the reference's."""
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    ref, got = make_layer(4, 9, 1.0), make_layer(4, 9, 1.0)
    for layer in (ref, got):
        layer.bn.momentum = None
    for step in range(3):
        a = run_layer(ref, x0 + step, None, fused=False)
        b = run_layer(got, x0 + step, None, fused=True, tile=4)
    compare({k: v for k, v in a.items() if k.startswith("buf.")}, {k: v for k, v in b.items() if k.startswith("buf.")})
    assert int(got.bn.num_batches_tracked) == 3


def test_eval_mode_and_outside_the_block_use_the_reference_path() -> None:
    layer = make_layer(4, 6, 1.0)
    x = torch.randn(2, 4, 3, 3)
    layer.eval()
    with layer.fused_step(lambda hw: (lambda s, e: soft(18, 6)[s:e])):
        x_hat, scores = layer(x)
    assert scores is not None and layer.last_loss is None and layer.last_scores is scores
    layer.train()
    x_hat, scores = layer(x)  # not armed: the reference path, scores returned
    assert scores.shape == (2, 6, 3, 3) and layer._fused is None


def eval_formula(layer: KDLayer, x: torch.Tensor) -> torch.Tensor:
    """METHOD §1 steps 1-4 in eval mode, written out on the B×C×H×W map (independent of the layer's code)."""
    w = layer.templates.scale * F.normalize(layer.templates.weight.flatten(1), dim=1)
    a = torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), w)
    bn = layer.bn
    shape = (1, -1, 1, 1)
    p = F.relu((a - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
               * bn.weight.view(shape) + bn.bias.view(shape))
    v = layer.values.scale * F.normalize(layer.values.weight.flatten(1), dim=1)
    return x + layer.alpha * torch.einsum("bkhw,ck->bchw", F.normalize(p, dim=1), v)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_scoreless_inference_matches_the_formula_and_forms_no_scores(alpha: float) -> None:
    layer = make_layer(6, 40, alpha).eval()
    x = torch.randn(3, 6, 5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = eval_formula(layer, x)
        ref, ref_scores = layer(x)                       # outside the block: the reference path
        with layer.without_scores():
            got, scores = layer(x)
    assert scores is None and layer.last_scores is None and ref_scores.shape == (3, 40, 5, 4)
    assert rel(got, want) < 1e-5 and rel(ref, want) < 1e-5
    if alpha == 0.0:
        assert got is x                                  # α = 0: nothing computed
    assert not layer._scoreless                          # the block restores the flag


def test_scoreless_only_for_eval_mode_without_grad() -> None:
    layer = make_layer(4, 6, 1.0)
    x = torch.randn(2, 4, 3, 3)
    with layer.without_scores():
        layer.eval()
        _, scores = layer(x)                             # grad enabled: reference path
        assert scores is not None
        layer.train()
        with torch.no_grad():
            _, scores = layer(x)                         # training mode (batch statistics): reference path
        assert scores is not None


def test_without_scores_over_a_model_and_evaluate() -> None:
    from letkd.engine.trainer import evaluate
    from letkd.layers import without_scores
    from letkd.models.attach import KDLayerSpec, attach_kd_layers

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x).mean((2, 3)))

    torch.manual_seed(0)
    student = Tiny()
    layers = attach_kd_layers(student, None, {"inter": KDLayerSpec("body.1", 7, 1.0),
                                              "penult": KDLayerSpec("body.3", 300, 1.0)}, input_shape=(3, 6, 6))
    student.train()
    student(torch.randn(16, 3, 6, 6))                   # move the BN running statistics off their init
    student.eval()
    x, y = torch.randn(20, 3, 6, 6), torch.randint(0, 5, (20,))
    with torch.no_grad():
        ref = student(x)
        assert all(layer.last_scores is not None for layer in layers.values())
        with without_scores(student):
            got = student(x)
            assert all(layer.last_scores is None for layer in layers.values())
    assert rel(got, ref) < 1e-5
    batches = [{"images": x[:8], "labels": y[:8]}, {"images": x[8:], "labels": y[8:]}]
    ev = evaluate(student, batches, torch.device("cpu"))
    assert ev["count"] == 20
    assert ev["acc"] == 100.0 * int((ref.argmax(1) == y).sum()) / 20
    assert abs(ev["loss"] - F.cross_entropy(ref, y).item()) < 1e-5
    assert not any(layer._scoreless for layer in layers.values())


def test_autocast_within_stated_tolerance() -> None:
    x0 = torch.randn(4, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    p = soft(144, 40)
    fp32 = run_layer(make_layer(16, 40, 1.0), x0, p, fused=False)
    for dtype, floor in ((torch.bfloat16, 0.02), (torch.float16, 0.005)):
        ref = run_layer(make_layer(16, 40, 1.0), x0, p, fused=False, autocast=dtype)
        got = run_layer(make_layer(16, 40, 1.0), x0, p, fused=True, tile=7, autocast=dtype)
        assert set(ref) == set(got)
        for k in fp32:
            if k.startswith("buf."):
                assert (got[k] - fp32[k]).abs().max() <= 1e-2, (dtype, k)
                continue
            assert got[k].dtype == ref[k].dtype, (dtype, k)
            assert rel(got[k], fp32[k]) <= 2 * rel(ref[k], fp32[k]) + floor, (dtype, k, rel(got[k], fp32[k]),
                                                                             rel(ref[k], fp32[k]))


def test_column_moments_are_the_batch_statistics_of_the_scores() -> None:
    g = torch.Generator().manual_seed(0)
    xn = F.normalize(torch.randn(50, 7, generator=g) + 2.0, dim=1)
    w = torch.randn(13, 7, generator=g)
    a = xn.double() @ w.double().t()
    mean, var = column_moments(xn, w)
    torch.testing.assert_close(mean.double(), a.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), a.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_row_tiles_and_errors() -> None:
    assert list(row_tiles(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    xn, w = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="both"):
        fused_kd_step(xn, w, None, torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="compute dtype"):
        fused_kd_step(xn, w.double(), None, None, None)
    with pytest.raises(ValueError, match="tile_rows"):
        with make_layer(3, 4, 1.0).fused_step(None, 0):
            pass
    layer = make_layer(3, 4, 1.0)
    with layer.fused_step(None), pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, 3, 1, 1))


def test_tile_targets_equal_the_full_targets() -> None:
    g = torch.Generator().manual_seed(0)
    t, rho = torch.randn(23, 5, generator=g), torch.randn(9, 5, generator=g)
    full = soft_targets(t, rho, tau=0.7)
    rows = SoftTargetRows(t, rho, tau=0.7)
    torch.testing.assert_close(torch.cat([rows(s, e) for s, e in row_tiles(23, 4)]), full, rtol=0, atol=0)
    z, labels = torch.randn(23, 3, generator=g), torch.randint(0, 4, (23,), generator=g)
    centres = torch.randn(4, 2, 3, generator=g)
    S = torch.softmax(torch.randn(8, 8, generator=g), 1)
    full = decision_targets(z, labels, centres, S)
    rows = DecisionTargetRows(z, labels, centres, S)
    torch.testing.assert_close(torch.cat([rows(s, e) for s, e in row_tiles(23, 5)]), full, rtol=0, atol=0)


# -- DDP: two CPU ranks, each normalising with its own rows' statistics --------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x_all = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(0))
        p_all = soft(36, 11)
        x, p = x_all[2 * rank:2 * rank + 2], p_all[18 * rank:18 * rank + 18]
        res = {}
        for fused in (False, True):
            layer = make_layer(5, 11, 1.0)
            model = DDP(layer)
            for _ in range(2):  # two steps: rank 0's running statistics are broadcast at the second
                layer.zero_grad()
                if fused:
                    with layer.fused_step(lambda hw: (lambda s, e: p[s:e]), 4):
                        x_hat, _ = model(x)
                    loss = layer.last_loss
                else:
                    x_hat, scores = model(x)
                    loss = template_kl_loss(scores, p)
                ((x_hat * x).sum() + loss).backward()
            res[fused] = {"running_mean": layer.bn.running_mean.clone(), "running_var": layer.bn.running_var.clone(),
                          **{n: q.grad.clone() for n, q in layer.named_parameters()}}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_ddp_two_ranks_same_bn_statistics_as_reference(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(ranks):
        ref, got = res[False], res[True]
        for k in ("running_mean", "running_var"):
            assert (ref[k] - got[k]).abs().max() <= 1e-5, (r, k)
        for k in ref:
            if k not in ("running_mean", "running_var"):
                assert rel(got[k], ref[k], 1e-6) <= 1e-4, (r, k)
    # each rank's statistics are its own rows' (not the global batch's): the ranks differ
    assert not torch.allclose(ranks[0][True]["running_var"], ranks[1][True]["running_var"])


# -- the whole method: letkd2 / letkd1 / quest with kernel=fused against kernel=reference -------------
def _method_step(name: str, kernel: str, tmp_path, **over) -> tuple[dict, dict, dict]:
    from test_letkd_method import ToyData, make

    data = ToyData(tmp_path)
    d = make(name, targets_dir=str(tmp_path / "targets"), kernel=kernel, tile_rows=7, **over)
    d.prepare(data, None)
    d.train()
    _, losses = d.forward_train(data.images[:6], data.labels[:6])
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in d.student.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in d.student.named_buffers() if n.startswith("kd_layers.")}
    assert all(layer._fused is None and layer.last_loss is None for layer in d.kd.values())
    return {k: v.detach() for k, v in losses.items()}, grads, buffers


@pytest.mark.parametrize("name,over", [
    ("letkd2", {"k_penult": 13, "k_sub": 3}),                      # K 13 and 12: not multiples of 8
    ("quest", {"k_penult": 13}),                                   # α = 0: no value branch
    ("letkd1", {"k_penult": 13, "supervise_penult": False}),       # a layer without loss
])
def test_method_fused_matches_reference(name: str, over: dict, tmp_path) -> None:
    """Teacher maps 24 channels, student 16 (C_teacher ≠ C_student); 96 rows per layer, tiles of 7."""
    ref = _method_step(name, "reference", tmp_path, **over)
    got = _method_step(name, "fused", tmp_path, **over)
    assert set(ref[0]) == set(got[0])
    for k in ref[0]:
        assert rel(got[0][k], ref[0][k]) <= 1e-4, k
    assert set(ref[1]) == set(got[1])
    for n in ref[1]:
        assert rel(got[1][n], ref[1][n], 1e-6) <= 1e-4, n
    for n in ref[2]:
        assert (got[2][n].double() - ref[2][n].double()).abs().max() <= 1e-5, n


def test_method_kernel_option(tmp_path) -> None:
    from test_letkd_method import make

    with pytest.raises(ValueError, match="method.kernel"):
        make(kernel="tiled")
    with pytest.raises(ValueError, match="tile_rows"):
        make(tile_rows=-1)
    d = make(targets_dir=str(tmp_path))
    assert d.params.kernel == "fused"
    with pytest.raises(ValueError, match="method.kernel=reference"):
        d.compile_hot_paths()


def test_deployed_student_after_fused_training_exports_to_onnx(tmp_path) -> None:
    """Training with the fused kernel leaves the deployed student a plain module: after a fused
    step it equals the reference-trained student, its ONNX export matches PyTorch and so does
    ``torch.compile`` of it (where a C++ compiler is available)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from letkd.export import to_onnx
    from test_letkd_method import ToyData, make

    data = ToyData(tmp_path)
    students = []
    for kernel in ("reference", "fused"):
        d = make(targets_dir=str(tmp_path / "t"), kernel=kernel)
        d.prepare(data, None)
        d.train()
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        _, losses = d.forward_train(data.images[:6], data.labels[:6])
        sum(losses.values()).backward()
        opt.step()
        students.append(d.deployable().eval())
    x = data.images[6:9]
    with torch.no_grad():
        want, got = students[0](x), students[1](x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    path = to_onnx(students[1], x, tmp_path / "student.onnx")
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, got.numpy(), atol=1e-4, rtol=0)
    from test_letkd_method import _can_compile_cpu

    if _can_compile_cpu():   # torch.compile of the deployed student (Inductor needs g++ and Python.h)
        with torch.no_grad():
            compiled = torch.compile(students[1])(x)
        torch.testing.assert_close(compiled, got, rtol=1e-4, atol=1e-5)


GPU = os.environ.get("LETKD_TEST_DEVICE", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(GPU.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_on_device_matches_reference() -> None:
    """``pytest -m gpu``: the fused kernel on the device (its default GPU tile) against the
    reference path on the device: fp32 within 1e-4; under bf16 autocast the fused path's error
    against fp32 at most twice the reference path's own plus 0.02 (as on the CPU)."""
    x0 = torch.randn(8, 32, 8, 8, generator=torch.Generator().manual_seed(0)).to(GPU)
    p = soft(512, 300).to(GPU)

    def step(fused: bool, autocast: bool) -> dict:
        layer = make_layer(32, 300, 1.0).to(GPU)
        layer.train()
        x = x0.clone().requires_grad_(True)
        with torch.autocast(torch.device(GPU).type, dtype=torch.bfloat16, enabled=autocast):
            if fused:
                with layer.fused_step(lambda hw: (lambda s, e: p[s:e])):
                    x_hat, _ = layer(x)
                loss = layer.last_loss
            else:
                x_hat, scores = layer(x)
                loss = template_kl_loss(scores, p)
            ((x_hat.float() * x0).sum() + loss).backward()
        return {"x_hat": x_hat.detach().float(), "loss": loss.detach(), "grad.x": x.grad,
                **{n: q.grad for n, q in layer.named_parameters()}}

    fp32 = step(False, False)
    compare(fp32, step(True, False))
    ref, got = step(False, True), step(True, True)
    for k in fp32:
        assert rel(got[k], fp32[k]) <= 2 * rel(ref[k], fp32[k]) + 0.02, (k, rel(got[k], fp32[k]), rel(ref[k], fp32[k]))
