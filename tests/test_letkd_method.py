"""letkd2 / letkd1 / quest distillers (METHOD §2-3) on toy networks."""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from letkd import methods
from letkd.export import to_onnx
from letkd.methods.base import Context
from letkd.methods.letkd import LetKD, ensure_targets, template_kl_loss, targets_path_for
from letkd.targets import load_targets


class Toy(nn.Module):
    """3 stages; ``stage3.0`` is the first block of the last stage. ``last_stride=1`` keeps an
    8×8 last map (for a 16×16 input) instead of 4×4, to exercise the spatial pooling."""

    def __init__(self, num_classes: int = 4, width: int = 8, last_stride: int = 2) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=last_stride, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage3(self.stage2(self.stage1(x))).mean((2, 3)))


class ToyData:
    def __init__(self, root, n: int = 24, nc: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.arange(n) % nc
        self.info = SimpleNamespace(name="toy", num_train=n, num_classes=nc)
        self.root = str(root)
        self.plain_calls = 0

    def plain_train_batches(self, batch_size: int):
        self.plain_calls += 1
        for s in range(0, len(self.labels), batch_size):
            yield {"images": self.images[s:s + batch_size], "labels": self.labels[s:s + batch_size],
                   "index": torch.arange(s, min(len(self.labels), s + batch_size))}


TAPS = dict(student_penult_tap="stage3", student_inter_tap="stage3.0",
            teacher_penult_tap="stage3", teacher_inter_tap="stage3.0")


def make(name: str = "letkd2", seed: int = 0, **over) -> LetKD:
    torch.manual_seed(100)
    teacher = Toy(width=12, last_stride=1)  # the same teacher weights in every call
    torch.manual_seed(seed)
    student = Toy(width=8)
    ctx = Context(num_classes=4, in_channels=3, image_size=(16, 16))
    params = {"k_penult": 8, "k_sub": 2, "kmeans_iters": 3, "fit_batch_size": 10, **TAPS, **over}
    return methods.create(name, student, teacher, ctx, params)


def test_registered() -> None:
    assert {"letkd1", "letkd2", "quest"} <= set(methods.names())
    q = methods.params_class("quest")()
    assert q.alpha_penult == 0.0 and not q.use_inter
    assert not methods.params_class("letkd1")().use_inter and methods.params_class("letkd2")().use_inter


def test_kl_loss_explicit() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 2, 2, generator=g)
    t = torch.softmax(torch.randn(8, 3, generator=g), 1)
    t[0] = torch.tensor([1.0, 0.0, 0.0])  # zeros in the target: 0·log 0 = 0
    rows = a.permute(0, 2, 3, 1).reshape(8, 3)
    ref = 0.0
    for i in range(8):
        q = torch.softmax(rows[i].double(), 0)
        ref += sum(float(t[i, k]) * (np.log(float(t[i, k])) - np.log(float(q[k]))) for k in range(3) if t[i, k] > 0)
    torch.testing.assert_close(template_kl_loss(a, t).double(), torch.tensor(ref / 8, dtype=torch.float64))
    # gradient w.r.t. the scores: (softmax(a) − p) / N per location, in the map layout
    a.requires_grad_(True)
    template_kl_loss(a, t).backward()
    want = ((torch.softmax(rows.double(), 1) - t.double()) / 8).reshape(2, 2, 2, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(a.grad.double(), want)


def test_letkd2_train_step(tmp_path) -> None:
    d = make(targets_dir=str(tmp_path / "cache"))
    assert d.kd["inter"].num_templates == 8 and d.kd["penult"].num_templates == 8
    assert d.t_pools == {"inter": (4, 4), "penult": (4, 4)}  # teacher 8×8 -> student 4×4
    data = ToyData(tmp_path)
    with pytest.raises(RuntimeError, match="prepare"):
        d.forward_train(data.images[:4], data.labels[:4])
    d.prepare(data, tmp_path / "run")
    path = targets_path_for(d, data)
    assert path.is_file() and path.parent == tmp_path / "cache" and data.plain_calls == 2
    assert load_targets(path)["meta"]["dataset"] == "toy"
    assert not any(k.startswith(("centroids", "score_matrix")) for k in d.state_dict())

    # a second run finds the cached artifact and does not touch the data
    d2 = make(targets_dir=str(tmp_path / "cache"), seed=1)
    d2.prepare(data, None)
    assert data.plain_calls == 2
    torch.testing.assert_close(d2.score_matrix, d.score_matrix)

    d.train()
    logits, losses = d.forward_train(data.images[:6], data.labels[:6])
    assert logits.shape == (6, 4) and set(losses) == {"ce", "penult", "inter"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["penult"] > 0 and losses["inter"] > 0
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    assert not {id(p) for p in d.teacher.parameters()} & {id(p) for p in d.trainable_parameters()}
    sum(losses.values()).backward()
    opt.step()
    after = d.student.state_dict()
    for key in ("stage1.0.weight", "fc.weight", "kd_layers.inter.templates.weight", "kd_layers.penult.values.weight",
                "kd_layers.penult.templates.scale"):
        assert not torch.equal(after[key], student_before[key]), key
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not d.teacher.training


def test_losses_match_manual_targets(tmp_path) -> None:
    d = make(targets_dir=str(tmp_path))
    data = ToyData(tmp_path)
    d.prepare(data)
    d.train()
    x, y = data.images[:3], data.labels[:3]
    _, losses = d.forward_train(x, y)
    # recompute the penultimate target by hand from the teacher map
    with torch.no_grad():
        t = d.teacher.stage3(d.teacher.stage2(d.teacher.stage1(x)))
    t = nn.functional.avg_pool2d(t, 2).permute(0, 2, 3, 1).reshape(-1, 24)
    dist = torch.cdist(t.double(), d.centroids.double()) ** 2
    target = torch.softmax(-dist, 1)
    d.student(x)
    a = d.kd["penult"].last_scores.permute(0, 2, 3, 1).reshape(-1, 8).double()
    ref = (target * (target.clamp_min(1e-300).log() - torch.log_softmax(a, 1))).sum(1).mean()
    torch.testing.assert_close(losses["penult"].double(), ref, atol=1e-5, rtol=1e-4)


def test_explicit_targets_mismatch_is_error(tmp_path) -> None:
    data = ToyData(tmp_path)
    d = make(targets=str(tmp_path / "t.pt"))
    d.prepare(data)
    other = make(targets=str(tmp_path / "t.pt"), k_penult=4)
    with pytest.raises(ValueError, match="k_penult: file has 8, this run has 4"):
        ensure_targets(other, data, tmp_path / "t.pt", progress=False)


def test_quest_alpha_zero_and_unsupervised(tmp_path) -> None:
    q = make("quest", targets_dir=str(tmp_path))
    assert set(q.kd) == {"penult"} and q.kd["penult"].alpha == 0.0
    x = torch.randn(2, 16, 4, 4)
    x_hat, a = q.kd["penult"](x)
    assert torch.equal(x_hat, x) and a.shape == (2, 8, 4, 4)
    q.prepare(ToyData(tmp_path))
    _, losses = q.forward_train(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert set(losses) == {"ce", "penult"}
    # capacity control: a layer without supervision needs no targets and gives no loss
    u = make("letkd1", supervise_penult=False)
    data = ToyData(tmp_path)
    u.prepare(data)
    assert data.plain_calls == 0
    _, losses = u.forward_train(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert set(losses) == {"ce"} and "kd_layers.penult" in u.extra_modules()


def test_deployable_student_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    d = make()
    student = d.deployable()
    student.train()
    student(torch.randn(4, 3, 16, 16))
    student.eval()
    path = to_onnx(student, torch.randn(2, 3, 16, 16), tmp_path / "s.onnx")  # letkd export's exporter
    x = torch.randn(3, 3, 16, 16)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, student(x).numpy(), atol=1e-4, rtol=0)


def _can_compile_cpu() -> bool:
    """Inductor's CPU backend builds C++ against the Python headers."""
    has_cxx = shutil.which("c++") is not None or shutil.which("g++") is not None
    return has_cxx and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


@pytest.mark.skipif(not _can_compile_cpu(),
                    reason="torch.compile on CPU needs a C++ compiler and the Python headers (apt-get install g++ python3-dev)")
def test_compile_hot_paths_matches_eager(tmp_path) -> None:
    """train.compile=kd_layers (compiles the reference kernel): same losses and gradients as eager mode,
    state_dict keys unchanged."""
    data = ToyData(tmp_path)
    eager, comp = make(targets_dir=str(tmp_path), kernel="reference"), make(targets_dir=str(tmp_path), kernel="reference")
    eager.prepare(data, None)
    comp.prepare(data, None)
    keys = list(comp.state_dict())
    comp.compile_hot_paths()
    assert list(comp.state_dict()) == keys
    for d in (eager, comp):
        d.train()
    x, y = data.images[:6], data.labels[:6]
    _, le = eager.forward_train(x, y)
    _, lc = comp.forward_train(x, y)
    for k in le:
        torch.testing.assert_close(lc[k], le[k], rtol=1e-5, atol=1e-6)
    sum(le.values()).backward()
    sum(lc.values()).backward()
    ge = dict(eager.student.named_parameters())
    for n, p in comp.student.named_parameters():
        torch.testing.assert_close(p.grad, ge[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    # methods without KD layers refuse the option with a message that names the fix
    kd = methods.create("kd", Toy(), Toy(), Context(num_classes=4, in_channels=3, image_size=(16, 16)), {})
    with pytest.raises(ValueError, match="train.compile=none"):
        kd.compile_hot_paths()
