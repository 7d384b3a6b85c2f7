"""Loss formulas of the baseline methods, one function per published equation.

Every function takes plain tensors (logits or features) and returns an *unweighted* scalar;
the methods multiply by their weights. Each loss is computed in fp32 whatever the autocast
context (``@fp32``: autocast off, floating tensor arguments cast to float32), so bf16/fp16
training changes the networks' arithmetic, never the distillation formulas. Where a formula has several conventions the docstring
names the one used (and the reference implementation it matches).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "embedding", "match_spatial", "warmup_factor",
    "kd_loss", "dkd_loss", "hint_loss", "attention_map", "at_loss", "sp_loss", "pkt_loss",
    "pairwise_distances", "rkd_distance_loss", "rkd_angle_loss", "vid_nll", "crd_nce_loss",
    "hcl_loss",
]


def fp32(fn):
    """Run a loss with autocast disabled and its floating tensor arguments (also inside lists) in fp32."""

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if isinstance(v, (list, tuple)):
            return type(v)(cast(x) for x in v)
        return v

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [cast(a) for a in args]
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


# -- small shared helpers ---------------------------------------------------------------------
def embedding(x: torch.Tensor) -> torch.Tensor:
    """A ``B×C×H×W`` map -> its global-average-pooled ``B×C`` vector (``B×D`` inputs: flattened).

    This is the "pooled feature" (RepDistiller ``feat[-1]``) that PKT, RKD and CRD use, taken
    here from the penultimate feature-map tap.
    """
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, 1)
    return x.flatten(1)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two ``B×C×H×W`` maps to the other's H×W (RepDistiller rule)."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[-2:] == t.shape[-2:]:
        return s, t
    if s.shape[-2] > t.shape[-2]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
    return s, F.adaptive_avg_pool2d(t, s.shape[-2:])


def warmup_factor(epoch: int | None, warmup: float, method: str = "") -> float:
    """Linear loss warm-up ``min(epoch / warmup, 1)`` with a 1-based ``epoch`` (mdistiller)."""
    if warmup <= 0:
        return 1.0
    if epoch is None:
        raise KeyError(f"{method or 'this method'} has a {warmup}-epoch loss warm-up and needs "
                       f"batch['epoch'] (1-based) in forward_train(images, labels, epoch=...)")
    return min(float(epoch) / float(warmup), 1.0)


# -- logit distillation ---------------------------------------------------------------------------
@fp32
def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al. 2015, eq. (2): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over the batch.

    Matches RepDistiller ``DistillKL`` (sum / batch · T²) and mdistiller ``kd_loss``.
    """
    log_p_s = F.log_softmax(s_logits / T, dim=1)
    p_t = F.softmax(t_logits / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


@fp32
def dkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
             T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, eq. (7): returns
    ``(TCKD, NCKD)``, each ``T² · KL`` averaged over the batch.

    TCKD = KL between the binary distributions ``[p_gt, 1 - p_gt]`` of teacher and student;
    NCKD = KL between the distributions over the non-target classes only (softmax of the
    non-target logits). The non-target classes are gathered explicitly rather than masked with
    ``-1000`` as in mdistiller: the same value, without the finite mask constant.
    """
    B, C = s_logits.shape
    gt = F.one_hot(labels, C).bool()
    s, t = s_logits / T, t_logits / T
    # binary (target vs rest) log-probabilities, computed stably with logsumexp
    s_all, t_all = s.logsumexp(1), t.logsumexp(1)
    s_gt, t_gt = s[gt], t[gt]
    s_rest, t_rest = s[~gt].view(B, C - 1), t[~gt].view(B, C - 1)
    log_bs = torch.stack([s_gt - s_all, s_rest.logsumexp(1) - s_all], 1)
    log_bt = torch.stack([t_gt - t_all, t_rest.logsumexp(1) - t_all], 1)
    tckd = F.kl_div(log_bs, log_bt, reduction="batchmean", log_target=True) * (T * T)
    nckd = F.kl_div(F.log_softmax(s_rest, 1), F.log_softmax(t_rest, 1), reduction="batchmean",
                    log_target=True) * (T * T)
    return tckd, nckd


# -- feature distillation -----------------------------------------------------------------------
@fp32
def hint_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Romero et al., "FitNets", ICLR 2015, eq. (3): ``mean((r(s) - t)²)`` (the regressor
    ``r`` is applied by the caller; RepDistiller ``HintLoss`` = ``nn.MSELoss`` mean)."""
    return F.mse_loss(s, t)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017: the spatial map
    ``Q = mean_c |f_c|^p`` flattened and L2-normalised (``B × HW``). RepDistiller uses
    ``f.pow(p)`` (no abs); equal for the default even ``p = 2``."""
    q = f.abs().pow(p).mean(1) if p % 2 else f.pow(p).mean(1)
    return F.normalize(q.flatten(1), dim=1)


@fp32
def at_loss(s: torch.Tensor, t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT, eq. (2) with β/2 folded into the weight: ``mean((Q_s/‖Q_s‖ - Q_t/‖Q_t‖)²)`` over
    batch and locations (RepDistiller ``Attention.at_loss``). Larger map pooled to the smaller."""
    s, t = match_spatial(s, t)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


@fp32
def sp_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tung & Mori, "Similarity-Preserving KD", ICCV 2019, eq. (4):
    ``‖norm(G_t) - norm(G_s)‖_F² / b²`` with ``G = F Fᵀ`` on flattened features and row-wise
    L2 normalisation."""
    b = s.shape[0]
    g_s = F.normalize(s.flatten(1) @ s.flatten(1).t(), dim=1)
    g_t = F.normalize(t.flatten(1) @ t.flatten(1).t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


@fp32
def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas, "Probabilistic Knowledge Transfer", ECCV 2018, eqs. (9)-(12) with the
    cosine kernel ``K(a,b) = (cos(a,b) + 1)/2``: conditional probabilities
    ``p_{i|j} = K_ij / Σ_k K_ik`` for teacher and student, loss ``mean_{ij} p^t log(p^t / p^s)``
    (mean over all b² entries, eps 1e-7, as in the authors' code used by RepDistiller)."""
    s = s.flatten(1)
    t = t.flatten(1)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    k_s = (s @ s.t() + 1.0) / 2.0
    k_t = (t @ t.t() + 1.0) / 2.0
    p_s = k_s / k_s.sum(1, keepdim=True)
    p_t = k_t / k_t.sum(1, keepdim=True)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``e`` (diagonal exactly 0; squared distances
    clamped at ``eps`` before the square root, as in RKD's reference code)."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp(min=eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


@fp32
def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al., "Relational Knowledge Distillation", CVPR 2019, eqs. (5)-(6): Huber
    (smooth-L1, δ=1) between the pairwise distances divided by their mean over distinct pairs."""
    s, t = s.flatten(1), t.flatten(1)
    with torch.no_grad():
        d_t = pairwise_distances(t)
        d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


@fp32
def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RKD eqs. (7)-(8): Huber between the cosines ``<e_ij, e_kj>`` of every triplet, where
    ``e_ij = (x_i - x_j)/‖x_i - x_j‖``, averaged over all b³ triplets (reference code)."""
    s, t = s.flatten(1), t.flatten(1)

    def cosines(x: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # [j, i] = x_i - x_j
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    with torch.no_grad():
        a_t = cosines(t)
    return F.smooth_l1_loss(cosines(s), a_t)


@fp32
def vid_nll(mu: torch.Tensor, t: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Ahn et al., "Variational Information Distillation", CVPR 2019, eq. (5) up to constants:
    Gaussian negative log-likelihood ``½ (log σ_c² + (t - μ)² / σ_c²)`` with per-channel
    variance ``σ_c² = softplus(log_scale_c) + eps``, averaged over all elements."""
    var = F.softplus(log_scale) + eps
    var = var.view(1, -1, *([1] * (mu.dim() - 2)))
    return (0.5 * ((mu - t).pow(2) / var + var.log())).mean()


@fp32
def crd_nce_loss(scores: torch.Tensor, num_data: int, valid: torch.Tensor | None = None,
                 eps: float = 1e-7) -> torch.Tensor:
    """Tian et al., "Contrastive Representation Distillation", ICLR 2020, eq. (18) (NCE form):
    ``scores`` is ``B × (1+K)``, column 0 the positive, the others K negatives, each already
    ``exp(<u,v>/τ) / Z``. With noise ``P_n = 1/N`` and ``m = K``:
    ``-(Σ_i log h_i(pos) + Σ_{i,k} log(1 - h_ik(neg))) / B``, ``h = P / (P + m·P_n)``.

    ``valid`` (``B × K`` bool) drops masked negatives (queue memory: same-class entries).
    """
    b, k1 = scores.shape
    m = k1 - 1
    mpn = m / float(num_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + mpn + eps))
    log_d0 = torch.log(mpn / (neg + mpn + eps))
    if valid is not None:
        log_d0 = log_d0 * valid.to(log_d0.dtype)
    return -(log_d1.sum() + log_d0.sum()) / b


@fp32
def hcl_loss(s_feats: list[torch.Tensor], t_feats: list[torch.Tensor],
             levels: tuple[int, ...] = (4, 2, 1)) -> torch.Tensor:
    """Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021, hierarchical
    context loss: per feature level, MSE at full resolution (weight 1) plus MSE of the maps
    average-pooled to each ``l×l`` in ``levels`` smaller than the map (weights ½, ¼, ⅛, ...),
    divided by the sum of the weights used; summed over feature levels."""
    total = s_feats[0].new_zeros(())
    for fs, ft in zip(s_feats, t_feats):
        h = fs.shape[-2]
        loss, w, wsum = F.mse_loss(fs, ft), 1.0, 1.0
        for lv in levels:
            if lv >= h:
                continue
            w /= 2.0
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, lv), F.adaptive_avg_pool2d(ft, lv))
            wsum += w
        total = total + loss / wsum
    return total
