"""Penultimate-layer teacher codebook and soft targets (METHOD §3a, Alg. 1 of the supplement; QuEST).

Offline: K-means (faiss, 20 iterations, fixed seed, no preprocessing) on the teacher's
per-location penultimate features gives ``K_penult`` centroids ``ρ_k``.
Online: ``p^T_{k|i} = softmax_k(−τ ‖t_i − ρ_k‖²)`` on raw features (:func:`soft_targets`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["kmeans", "fit_codebook", "soft_targets", "SoftTargetRows"]


def kmeans(x: torch.Tensor | np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Plain Lloyd K-means with faiss on ``x`` (n×d) -> centroids (k×d float32).

    Every row is used: faiss' default sub-sampling to 256 points per centroid is switched off
    (``max_points_per_centroid`` set above n/k), and its "too few points" warning threshold is
    lowered to 1. Initialisation: faiss' random pick of k rows with ``seed``; empty clusters
    are re-seeded by faiss by splitting large ones. Raises ValueError if ``n < k``.
    """
    import faiss  # local import: only the offline fit needs it

    x = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects an n×d matrix, got shape {x.shape}")
    n, d = x.shape
    if n < k:
        raise ValueError(f"K-means with K={k} needs at least {k} samples, got {n}; use a smaller K "
                         f"(e.g. method.k_penult / k_sub) or more training data")
    if not np.isfinite(x).all():
        raise ValueError("K-means input contains NaN or Inf features; check the teacher")
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed), verbose=False, spherical=False,
                      max_points_per_centroid=int(math.ceil(n / k)) + 1, min_points_per_centroid=1)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, d)


def fit_codebook(features: torch.Tensor, k: int = 4096, niter: int = 20, seed: int = 0) -> torch.Tensor:
    """Alg. 1 offline step: the ``k`` K-means centroids of the per-location penultimate
    features (rows of ``features``) -> tensor k×C float32."""
    return torch.from_numpy(kmeans(features, k, niter, seed))


def _logit_factors(t: torch.Tensor, centroids: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[t, 1]`` (N×(C+1)) and ``[2τρ, −τ‖ρ‖²]ᵀ`` ((C+1)×K), fp32: their product is the logits
    ``τ (2 t·ρ_k − ‖ρ_k‖²)`` as ONE matrix product (an addmm would first copy the broadcast bias
    into the N×K output)."""
    if t.dim() != 2 or centroids.dim() != 2 or t.shape[1] != centroids.shape[1]:
        raise ValueError(f"soft_targets: t is N×C and centroids K×C with the same C; got {tuple(t.shape)} "
                         f"and {tuple(centroids.shape)}")
    with torch.autocast(device_type=t.device.type, enabled=False):
        t = t.float()
        rho = centroids.float()
        t_aug = torch.cat([t, t.new_ones(t.shape[0], 1)], dim=1)
        rho_aug = torch.cat([(2.0 * float(tau)) * rho, (-float(tau)) * (rho * rho).sum(1, keepdim=True)], dim=1)
        return t_aug, rho_aug.t().contiguous()


def soft_targets(t: torch.Tensor, centroids: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Alg. 1 online step: ``softmax_k(−τ ‖t_i − ρ_k‖²)`` for rows ``t`` (N×C) -> N×K.

    Computed in fp32 (autocast off) from the expansion ``‖t‖² − 2 t·ρ + ‖ρ‖²``. The
    ``‖t_i‖²`` term is the same for every k, so it cancels in the softmax and is dropped:
    the logits are ``τ (2 t·ρ_k − ‖ρ_k‖²)``, which avoids cancelling two large numbers and is
    exactly the same distribution.
    """
    t_aug, rho_aug_t = _logit_factors(t, centroids, tau)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return torch.softmax(t_aug @ rho_aug_t, dim=1)


class SoftTargetRows:
    """:func:`soft_targets` one row range at a time (``rows(start, stop)``, the fused KD step's
    :data:`letkd.fused_step.TileTargets`): the same values, without an N×K tensor."""

    def __init__(self, t: torch.Tensor, centroids: torch.Tensor, tau: float = 1.0) -> None:
        self.t_aug, self.rho_aug_t = _logit_factors(t, centroids, tau)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        with torch.autocast(device_type=self.t_aug.device.type, enabled=False):
            return torch.softmax(self.t_aug[start:stop] @ self.rho_aug_t, dim=1)

    def with_entropy(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and their ``Σ P log P`` without a logarithm per entry: with the logits
        shifted by their row maximum, ``Z' = Z − max Z``, ``log P = Z' − lse(Z')`` and
        ``lse(Z'_i) = −log max_k P_ik``, so ``Σ_k P log P = P_i·Z'_i + log max_k P_ik``."""
        with torch.autocast(device_type=self.t_aug.device.type, enabled=False):
            z = self.t_aug[start:stop] @ self.rho_aug_t
            z.sub_(z.amax(1, keepdim=True))
            p = torch.softmax(z, dim=1)
            return p, torch.dot(p.reshape(-1), z.reshape(-1)) + torch.log(p.amax(1)).sum()
