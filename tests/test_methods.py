"""Baseline methods: each loss against an independent reference, and one training step.

Toy models only (no model zoo): a 3-stage CNN with an explicit ``letkd_taps`` table.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from letkd.methods import Context, create
from letkd.methods import losses as L


@pytest.fixture(autouse=True)
def _one_thread():
    """These toy-sized losses and steps run fastest on one thread (set per test, not at import,
    so that collecting this module does not change the thread count of the rest of the suite)."""
    torch.set_num_threads(1)


class ToyNet(nn.Module):
    """stem -> layer1 (8x8) -> layer2 (4x4) -> layer3 (2x2) -> pool -> fc, on 8x8 inputs."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 5) -> None:
        super().__init__()
        w1, w2, w3 = widths

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(3, w1, 1)
        self.layer1 = block(w1, w1, 1)
        self.layer2 = block(w1, w2, 2)
        self.layer3 = block(w2, w3, 2)
        self.fc = nn.Linear(w3, num_classes)
        self.letkd_taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "penultimate": "layer3"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make(name: str, params: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    student, teacher = ToyNet((4, 8, 16)), ToyNet((6, 12, 24))
    ctx = Context(num_classes=5, in_channels=3, image_size=(8, 8), num_train=40, epochs=30)
    return create(name, student, teacher, ctx, params or {})


def batch(seed: int = 1, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g)
    y = torch.tensor([i % 5 for i in range(b)])
    return x, y, {"index": torch.arange(b, dtype=torch.long) * 3, "epoch": 25}


SMALL = {"crd": {"nce_k": 8}, "combo": {"parts": [{"name": "crd", "weight": 0.8, "nce_k": 8},
                                                  {"name": "kd", "weight": 1.0}]}}
ALL = ["kd", "dkd", "fitnet", "at", "sp", "pkt", "rkd", "vid", "crd", "reviewkd", "simkd", "combo"]


# -- reference implementations (numpy, float64, explicit loops) ---------------------------------
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_kd(s, t, T):
    s, t = s.double().numpy(), t.double().numpy()
    tot = 0.0
    for i in range(len(s)):
        p, q = np_softmax(t[i] / T), np_softmax(s[i] / T)
        tot += np.sum(p * (np.log(p) - np.log(q)))
    return tot / len(s) * T * T


def ref_dkd(s, t, y, T):
    s, t = s.double().numpy(), t.double().numpy()
    tckd = nckd = 0.0
    for i in range(len(s)):
        ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
        g = int(y[i])
        bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        tckd += np.sum(bt * np.log(bt / bs))
        rs, rt = np.delete(ps, g), np.delete(pt, g)
        rs, rt = rs / rs.sum(), rt / rt.sum()
        nckd += np.sum(rt * np.log(rt / rs))
    return tckd / len(s) * T * T, nckd / len(s) * T * T


def ref_at_map(f, p=2):
    f = f.double().numpy()
    out = []
    for i in range(f.shape[0]):
        q = (np.abs(f[i]) ** p).mean(0).reshape(-1)
        out.append(q / max(np.linalg.norm(q), 1e-12))
    return np.stack(out)


def ref_sp(s, t):
    b = s.shape[0]
    s, t = s.double().reshape(b, -1).numpy(), t.double().reshape(b, -1).numpy()
    tot = 0.0
    for i in range(b):
        gs = np.array([s[i] @ s[j] for j in range(b)])
        gt = np.array([t[i] @ t[j] for j in range(b)])
        gs, gt = gs / np.linalg.norm(gs), gt / np.linalg.norm(gt)
        tot += np.sum((gt - gs) ** 2)
    return tot / b / b


def ref_pkt(s, t, eps=1e-7):
    s, t = s.double().numpy(), t.double().numpy()
    b = len(s)

    def probs(x):
        k = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                k[i, j] = (x[i] @ x[j] / (np.linalg.norm(x[i]) + eps) / (np.linalg.norm(x[j]) + eps) + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(s), probs(t)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def ref_rkd(s, t):
    s, t = s.double().numpy(), t.double().numpy()
    b = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    def angles(x):
        a = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = x[i] - x[j], x[k] - x[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    a[j, i, k] = 0.0 if nu == 0 or nv == 0 else (u @ v) / (nu * nv)
        return a.reshape(-1)

    return huber(dist(s), dist(t)), huber(angles(s), angles(t))


def ref_nce(x, n, valid=None, eps=1e-7):
    x = x.double().numpy()
    b, k1 = x.shape
    m = k1 - 1
    tot = 0.0
    for i in range(b):
        tot += math.log(x[i, 0] / (x[i, 0] + m / n + eps))
        for k in range(1, k1):
            if valid is None or valid[i, k - 1]:
                tot += math.log((m / n) / (x[i, k] + m / n + eps))
    return -tot / b


def ref_hcl(fs_list, ft_list):
    tot = 0.0
    for fs, ft in zip(fs_list, ft_list):
        fs, ft = fs.double().numpy(), ft.double().numpy()
        h = fs.shape[-1]
        loss, wsum, w = np.mean((fs - ft) ** 2), 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= h:
                continue
            w /= 2
            k = h // lv   # sizes used in tests are divisible: plain block averages
            ps = fs.reshape(*fs.shape[:2], lv, k, lv, k).mean((3, 5))
            pt = ft.reshape(*ft.shape[:2], lv, k, lv, k).mean((3, 5))
            loss += w * np.mean((ps - pt) ** 2)
            wsum += w
        tot += loss / wsum
    return tot


def close(a, b, tol=1e-5):
    a, b = (float(v.detach()) if torch.is_tensor(v) else float(v) for v in (a, b))
    assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)


# -- formula tests -------------------------------------------------------------------------------
def test_kd_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    close(L.kd_loss(s, t, 4.0), ref_kd(s, t, 4.0))


def test_dkd_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    tckd, nckd = L.dkd_loss(s, t, y, 4.0)
    rt, rn = ref_dkd(s, t, y, 4.0)
    close(tckd, rt)
    close(nckd, rn)


def test_at_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    np.testing.assert_allclose(L.attention_map(s).double().numpy(), ref_at_map(s), rtol=1e-5, atol=1e-7)
    close(L.at_loss(s, t), np.mean((ref_at_map(s) - ref_at_map(t)) ** 2))


def test_sp_pkt_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    close(L.sp_loss(s, t), ref_sp(s, t))
    es, et = torch.randn(5, 6, generator=g), torch.randn(5, 9, generator=g)
    close(L.pkt_loss(es, et), ref_pkt(es, et))


def test_rkd_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    rd, ra = ref_rkd(s, t)
    close(L.rkd_distance_loss(s, t), rd)
    close(L.rkd_angle_loss(s, t), ra)


def test_vid_and_hint_formulas():
    g = torch.Generator().manual_seed(0)
    mu, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    a = torch.tensor([0.1, -2.0, 3.0])
    var = np.log1p(np.exp(a.double().numpy())) + 1e-5
    d = (mu - t).double().numpy() ** 2
    ref = np.mean([0.5 * (d[n, c, i, j] / var[c] + np.log(var[c]))
                   for n in range(2) for c in range(3) for i in range(2) for j in range(2)])
    close(L.vid_nll(mu, t, a), ref)
    close(L.hint_loss(mu, t), np.mean(d))


def test_crd_nce_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g) * 0.01
    close(L.crd_nce_loss(x, 40), ref_nce(x, 40))
    valid = torch.rand(3, 4, generator=g) > 0.3
    close(L.crd_nce_loss(x, 40, valid), ref_nce(x, 40, valid.numpy()))


def test_hcl_formula():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 1, 1, generator=g)]
    ft = [torch.randn_like(f) for f in fs]
    close(L.hcl_loss(fs, ft), ref_hcl(fs, ft))


# -- each method's loss through its wiring (eval mode: BN deterministic) ------------------------
def run_eval(name: str, params: dict | None = None):
    d = make(name, params)
    d.eval()
    x, y, extra = batch()
    logits, losses = d.forward_train(x, y, **extra)
    return d, x, y, logits, losses


def test_kd_method():
    d, x, y, logits, losses = run_eval("kd")
    t = d.teacher(x)
    close(losses["kd"], 0.9 * ref_kd(logits.detach(), t, 4.0))
    close(losses["ce"], 0.1 * F.cross_entropy(logits, y))


def test_dkd_method_and_warmup():
    d, x, y, logits, losses = run_eval("dkd")
    rt, rn = ref_dkd(logits.detach(), d.teacher(x), y, 4.0)
    close(losses["tckd"], 1.0 * rt)
    close(losses["nckd"], 8.0 * rn)
    _, l1 = d.forward_train(x, y, epoch=5)
    close(l1["nckd"], 8.0 * rn * 5 / 20)


def test_feature_methods_wiring():
    d, x, y, logits, losses = run_eval("at")
    ref = sum(np.mean((ref_at_map(d.s_feats[k].detach()) - ref_at_map(d.t_feats[k])) ** 2)
              for k in ("stage1", "stage2", "stage3"))
    close(losses["at"], 1000 * ref)
    d, x, y, logits, losses = run_eval("sp")
    close(losses["sp"], 3000 * ref_sp(d.s_feats["penultimate"].detach(), d.t_feats["penultimate"]), 1e-4)
    pooled = lambda f: f.detach().mean((2, 3))  # noqa: E731
    d, x, y, logits, losses = run_eval("pkt")
    close(losses["pkt"], 30000 * ref_pkt(pooled(d.s_feats["penultimate"]), pooled(d.t_feats["penultimate"])), 1e-4)
    d, x, y, logits, losses = run_eval("rkd")
    rd, ra = ref_rkd(pooled(d.s_feats["penultimate"]), pooled(d.t_feats["penultimate"]))
    close(losses["rkd_distance"], 25 * rd)
    close(losses["rkd_angle"], 50 * ra)


def test_fitnet_method():
    d, x, y, logits, losses = run_eval("fitnet")
    s, t = d.s_feats["stage2"], d.t_feats["stage2"]
    assert isinstance(d.regressor.conv, nn.Conv2d) and d.regressor.conv.kernel_size == (1, 1)
    with torch.no_grad():
        r = d.regressor.bn(d.regressor.conv(s)).clamp(min=0)
    close(losses["feat"], 100 * np.mean((r - t).double().numpy() ** 2))


def test_fitnet_regressor_shapes():
    from letkd.methods.fitnet import ConvRegressor
    for s, t in [((4, 8, 8), (6, 4, 4)), ((4, 4, 4), (6, 8, 8)), ((4, 6, 6), (6, 4, 4)), ((4, 3, 3), (6, 8, 8))]:
        r = ConvRegressor(s, t)
        out = r(torch.randn(2, *s))
        assert out.shape[1:] == r.target(torch.randn(2, *t)).shape[1:]


def test_vid_method():
    d, x, y, logits, losses = run_eval("vid")
    ref = 0.0
    for reg, k in zip(d.regressors, ("stage1", "stage2", "stage3")):
        with torch.no_grad():
            mu = reg.mean(d.s_feats[k]).double().numpy()
        var = np.log1p(np.exp(reg.log_scale.detach().double().numpy())) + 1e-5
        tt = d.t_feats[k].double().numpy()
        ref += np.mean(0.5 * ((mu - tt) ** 2 / var[None, :, None, None] + np.log(var)[None, :, None, None]))
    close(losses["vid"], ref)
    close(F.softplus(d.regressors[0].log_scale[0]) + 1e-5, 5.0)


def test_crd_method_bank_against_loop():
    d = make("crd", SMALL["crd"])
    d.eval()
    x, y, extra = batch()
    mem = copy.deepcopy(d.memory)
    torch.manual_seed(123)
    logits, losses = d.forward_train(x, y, **extra)
    # replay: same negatives (same RNG), scores by explicit loops over the pre-update memory
    torch.manual_seed(123)
    idx = mem.sample(extra["index"], y)
    with torch.no_grad():
        vs = d.embed_s(d.s_feats["penultimate"].mean((2, 3)))
        vt = d.embed_t(d.t_feats["penultimate"].mean((2, 3)))
    b, k1 = idx.shape
    out_s, out_t = torch.zeros(b, k1, dtype=torch.float64), torch.zeros(b, k1, dtype=torch.float64)
    for i in range(b):
        assert idx[i, 0] == extra["index"][i]
        for k in range(k1):
            out_s[i, k] = math.exp(float(mem.mem_t[idx[i, k]] @ vs[i]) / 0.07)
            out_t[i, k] = math.exp(float(mem.mem_s[idx[i, k]] @ vt[i]) / 0.07)
    out_s, out_t = out_s / (out_s.mean() * 40), out_t / (out_t.mean() * 40)
    ref = ref_nce(out_s, 40) + ref_nce(out_t, 40)
    close(losses["crd"], 0.8 * ref, 1e-4)
    # negatives of another class (labels learnt from the batch just seen)
    idx2 = d.memory.sample(extra["index"], y)
    lab = d.memory.labels[idx2[:, 1:]]
    assert not ((lab == y[:, None]) & (lab >= 0)).any()


def test_crd_memory_momentum_update():
    d = make("crd", SMALL["crd"])
    x, y, extra = batch()
    before_s, before_t = d.memory.mem_s.clone(), d.memory.mem_t.clone()
    d.forward_train(x, y, **extra)
    with torch.no_grad():
        vs = d.embed_s(d.s_feats["penultimate"].mean((2, 3)))
        vt = d.embed_t(d.t_feats["penultimate"].mean((2, 3)))
    for j, i in enumerate(extra["index"].tolist()):
        e_s = 0.5 * before_s[i] + 0.5 * vs[j]
        e_t = 0.5 * before_t[i] + 0.5 * vt[j]
        torch.testing.assert_close(d.memory.mem_s[i], e_s / e_s.norm())
        torch.testing.assert_close(d.memory.mem_t[i], e_t / e_t.norm())
        assert d.memory.labels[i] == y[j]
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[extra["index"]] = False
    assert torch.equal(d.memory.mem_s[untouched], before_s[untouched])


def test_crd_queue_mode():
    d = make("crd", {"nce_k": 8, "memory": "queue"})
    x, y, extra = batch()
    _, l1 = d.forward_train(x, y, **extra)
    assert torch.isfinite(l1["crd"]) and int(d.memory.ptr) == 6
    assert torch.equal(d.memory.indices[:6], extra["index"])
    _, l2 = d.forward_train(x, y, **extra)          # same images: all masked as negatives
    assert int(d.memory.ptr) == 4 and torch.isfinite(l2["crd"])
    with pytest.raises(KeyError):
        d.forward_train(x, y)


def test_reviewkd_method():
    d, x, y, logits, losses = run_eval("reviewkd")
    assert len(d.abfs) == 4 and d.abfs[0].att is None and d.abfs[1].att is not None
    with torch.no_grad():
        outs = d.review()
    t = [d.t_feats[k] for k in ("stage1", "stage2", "stage3")] + [d.t_feats["penultimate"].mean((2, 3), keepdim=True)]
    assert [o.shape for o in outs] == [f.shape for f in t]
    close(losses["reviewkd"], 5.0 * ref_hcl(outs, t))


def test_simkd_method_and_deployable():
    d, x, y, logits, losses = run_eval("simkd")
    assert d._deployed.classifier is d.teacher.fc
    with torch.no_grad():
        z = d.projector(d.s_feats["penultimate"])
        ref_logits = d.teacher.fc(z.mean((2, 3)))
    torch.testing.assert_close(logits.detach(), ref_logits)
    close(losses["feat"], np.mean((z - d.t_feats["penultimate"]).double().numpy() ** 2))
    close(losses["ce"], 0.0)
    dep = d.deployable()
    torch.testing.assert_close(dep(x), ref_logits)
    torch.testing.assert_close(d(x), ref_logits)
    n_extra = sum(p.numel() for p in dep.parameters()) - sum(p.numel() for p in d.student.parameters())
    assert n_extra == sum(p.numel() for p in d.projector.parameters()) + sum(p.numel() for p in d.teacher.fc.parameters())
    dep2 = copy.deepcopy(dep)
    torch.testing.assert_close(dep2(x), ref_logits)


def test_combo_equals_sum_of_parts():
    d, x, y, logits, losses = run_eval("combo", copy.deepcopy(SMALL["combo"]))
    assert set(losses) == {"ce", "crd", "kd"}
    close(losses["ce"], F.cross_entropy(logits, y))
    close(losses["kd"], 1.0 * ref_kd(logits.detach(), d.teacher(x), 4.0))
    # the CRD term equals a standalone CRD with the same modules and memory on the same batch
    crd = make("crd", SMALL["crd"])
    crd.eval()
    crd.student.load_state_dict(d.student.state_dict())
    crd.teacher.load_state_dict(d.teacher.state_dict())
    d2 = make("combo", copy.deepcopy(SMALL["combo"]))
    d2.eval()
    for mod in ("embed_s", "embed_t", "memory"):
        getattr(crd, mod).load_state_dict(getattr(d2.parts[0], mod).state_dict())
    torch.manual_seed(7)
    _, lc = d2.forward_train(x, y, **batch()[2])
    torch.manual_seed(7)
    _, ls = crd.forward_train(x, y, **batch()[2])
    close(lc["crd"], ls["crd"])
    # one teacher forward per batch, student appears once in state_dict
    calls = []
    h = d2.teacher.register_forward_hook(lambda *a: calls.append(1))
    d2.forward_train(x, y, **batch()[2])
    h.remove()
    assert len(calls) == 1
    assert not any(k.startswith("parts.0.student") for k in d2.state_dict())


def test_combo_config_validation():
    from letkd.config import ConfigError
    from letkd.methods import make_params
    p = make_params("combo", {"name": "combo", "parts": [{"name": "kd", "weight": 1.0}]})
    assert p.parts == [{"name": "kd", "T": 4.0, "weight": 1.0}]
    for bad in ([{"name": "kd", "ce_weight": 1}], [{"name": "kd", "nope": 1}], [{"name": "simkd"}], []):
        with pytest.raises(ConfigError):
            make_params("combo", {"parts": bad})


# -- one optimisation step per method -------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_one_step_updates_student_and_extras_not_teacher(name):
    d = make(name, copy.deepcopy(SMALL.get(name, {})))
    d.train()
    x, y, extra = batch()
    teacher_state = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in d.student.named_parameters()}
    extras = {n: {k: v.clone() for k, v in m.named_parameters()} for n, m in d.extra_modules().items()}
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    params = d.trainable_parameters()
    assert not any(id(p) in teacher_ids for p in params)
    opt = torch.optim.SGD(params, lr=0.5)
    logits, losses = d.forward_train(x, y, **extra)
    assert logits.shape == (6, 5) and "ce" in losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    opt.step()
    assert any(not torch.equal(v, dict(d.student.named_parameters())[k]) for k, v in student_state.items())
    for n, before in extras.items():
        if before:
            now = dict(d.extra_modules()[n].named_parameters())
            assert any(not torch.equal(v, now[k]) for k, v in before.items()), f"{name}: {n} unchanged"
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"{name}: teacher {k} changed"
    assert not d.teacher.training and all(not m.training for m in d.teacher.modules())
    if name in ("fitnet", "vid", "crd", "reviewkd", "simkd", "combo"):
        assert extras and any(extras.values()), f"{name} should have trained extra modules"
