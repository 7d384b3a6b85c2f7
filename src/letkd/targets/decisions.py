"""Intermediate-layer targets: the teacher's decisions (METHOD §3b, Alg. 2 of the supplement).

Steps (numbers as in METHOD §3b) and where they are implemented:

1. LDA on the teacher's per-location intermediate features: :class:`ClassStats` (streamed,
   exact, float64) and :func:`fit_lda`; online map :func:`lda_project`.
2. Per-class K-means with ``K_sub`` centres on the LDA features: :func:`fit_subclass_centres`;
   label-conditioned sub-class ``h1(i) = (y, k)``: :func:`assign_subclasses`.
3. Prototypes = mean LDA feature per sub-class: :meth:`DecisionStats.add_prototypes`.
4. Decision ``h2(i)`` = nearest prototype among all ``K_sub·num_classes``:
   :func:`nearest_prototype`.
5. Row-stochastic score matrix ``S``: :meth:`DecisionStats.add_decisions` +
   :meth:`DecisionStats.score_matrix`.
Online target ``S[(y, k*), :]``: :func:`decision_targets`.

Sub-class ``(c, k)`` has flat index ``c·K_sub + k`` everywhere (rows/columns of ``S``).

Choices where the paper is silent (also in docs/method.md):

* LDA is solved as ``Sb v = λ Sw v`` with ``Sw`` the within-class covariance plus a ridge
  ``ridge · mean(diag(Sw))·I`` (default 1e-6, raised ×10 until Cholesky succeeds), by
  Cholesky whitening; ``W`` is scaled so that ``Wᵀ Sw W = I``; each column's sign is fixed so
  its largest-magnitude entry is positive.
* Per-class K-means uses seed ``seed + c`` for class ``c``. A class with fewer than ``K_sub``
  distinct locations uses its distinct points as centres and fills the remaining centres with
  copies of its first distinct point; ``argmin`` returns the first of equal distances, so the
  copies never receive a location: they are *empty* sub-classes. A class with no locations has
  zero centres, all empty.
* Empty sub-class (a centre with no assigned location): its prototype is its K-means centre
  (kept for inspection) but it is excluded from the nearest-prototype search of step 4 (a
  prototype of nothing cannot be a decision), and its row of ``S`` is one-hot on itself.
"""
from __future__ import annotations

import numpy as np
import torch

from letkd.targets.codebook import kmeans

__all__ = ["ClassStats", "fit_lda", "lda_project", "fit_subclass_centres", "assign_subclasses",
           "nearest_prototype", "DecisionStats", "decision_targets", "DecisionTargetRows"]


class ClassStats:
    """Streamed class statistics for exact LDA (step 1), accumulated in float64.

    Keeps per-class counts and sums and one total second moment about a fixed shift (the
    first batch's mean, to avoid cancellation): ``M = Σ_i (x_i − s)(x_i − s)ᵀ``. Then
    ``Sw = M − Σ_c n_c (μ_c − s)(μ_c − s)ᵀ`` (within-class scatter) and
    ``Sb = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ`` (between-class scatter) — memory O(C² + classes·C),
    not a C×C matrix per class.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.second = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.shift: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` (n×C) with class labels ``y`` (n)."""
        if x.shape[0] == 0:
            return
        if x.shape[1] != self.dim:
            raise ValueError(f"ClassStats for C={self.dim} got rows of width {x.shape[1]}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        dev = self.counts.device
        x = x.to(dev, torch.float64)
        y = y.to(dev, torch.long)
        if self.shift is None:
            self.shift = x.mean(0)
        xs = x - self.shift
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.sums.index_add_(0, y, xs)
        self.second.addmm_(xs.t(), xs)

    def all_reduce(self) -> "ClassStats":
        """Sum the statistics of every DDP rank (each streamed its shard); no-op when single.

        The ranks' second moments are about different shifts (their first batches' means): each
        is first moved to a common shift ``s`` (the mean of the ranks' shifts) with
        ``Σ(x−s)(x−s)ᵀ = M + S δᵀ + δ Sᵀ + n δδᵀ``, ``δ = s_r − s``, ``S = Σ(x − s_r)``; then
        counts, sums and moments are summed in float64. Every rank ends with the same result.
        """
        from letkd.engine import dist

        if dist.world_size() == 1:
            return self
        dev = self.counts.device
        mine = self.shift if self.shift is not None else torch.zeros(self.dim, dtype=torch.float64, device=dev)
        has = torch.tensor([1.0 if self.shift is not None else 0.0], dtype=torch.float64, device=dev)
        both = dist.all_reduce_sum(torch.cat([mine * has, has]))
        if float(both[-1]) == 0:
            return self
        common = both[:-1] / both[-1]
        if self.shift is not None:
            delta = self.shift - common
            s_tot = self.sums.sum(0)
            n = self.counts.sum()
            self.second += torch.outer(s_tot, delta) + torch.outer(delta, s_tot) + n * torch.outer(delta, delta)
            self.sums += self.counts[:, None] * delta[None, :]
        self.shift = common
        for t in (self.counts, self.sums, self.second):
            dist.all_reduce_sum(t)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum().item())

    def scatter(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global mean μ, within-class scatter Sw, between-class scatter Sb), float64."""
        if self.shift is None:
            raise ValueError("ClassStats is empty: no features were streamed")
        n = self.counts.sum()
        present = self.counts > 0
        cnt = self.counts[present]
        mu_c = self.sums[present] / cnt[:, None]                 # class means minus shift
        mu = self.sums.sum(0) / n                                # global mean minus shift
        sw = self.second - (mu_c * cnt[:, None]).t() @ mu_c
        dm = mu_c - mu
        sb = (dm * cnt[:, None]).t() @ dm
        return mu + self.shift, (sw + sw.t()) / 2, (sb + sb.t()) / 2


def fit_lda(stats: ClassStats, dim: int, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: exact LDA from streamed statistics -> (mean C, W C×d, eigenvalues d), float32.

    Solves ``Sb v = λ Sw v`` (covariances, i.e. scatters / N) through the Cholesky factor
    ``L`` of the ridged ``Sw``: ``eigh(L⁻¹ Sb L⁻ᵀ) = U Λ Uᵀ``, ``W = L⁻ᵀ U`` for the ``dim``
    largest λ (so ``Wᵀ Sw W = I``). ``dim`` must be ≤ min(C, classes − 1) — the caller picks
    ``d = min(60, C, num_classes − 1)``.
    """
    mean, sw, sb = stats.scatter()
    n = float(stats.counts.sum())
    sw, sb = sw / n, sb / n
    c = sw.shape[0]
    if not 1 <= dim <= c:
        raise ValueError(f"LDA dimension must be in [1, {c}], got {dim}")
    scale = float(torch.diagonal(sw).mean()) or 1.0
    eye = torch.eye(c, dtype=sw.dtype, device=sw.device)
    lam = ridge
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(sw + lam * scale * eye)
        if int(info) == 0:
            break
        lam = lam * 10 if lam > 0 else 1e-9
    else:
        raise RuntimeError("LDA: within-class covariance could not be factorised even with a large ridge")
    a = torch.linalg.solve_triangular(chol, sb, upper=False)
    a = torch.linalg.solve_triangular(chol, a.t(), upper=False).t()      # L⁻¹ Sb L⁻ᵀ
    evals, u = torch.linalg.eigh((a + a.t()) / 2)
    evals, u = evals.flip(0)[:dim], u.flip(1)[:, :dim]
    w = torch.linalg.solve_triangular(chol.t(), u, upper=True)           # L⁻ᵀ U
    sign = torch.sign(w.gather(0, w.abs().argmax(0, keepdim=True)))
    w = w * torch.where(sign == 0, torch.ones_like(sign), sign)
    return mean.float(), w.float(), evals.float()


def lda_project(x: torch.Tensor, mean: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Step 1 online: the frozen affine 1×1 map ``z = Wᵀ(x − mean)``.

    ``x`` is rows (N×C -> N×d) or a map (B×C×H×W -> B×d×H×W). Computed in fp32.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        if x.dim() == 2:
            return (x - mean) @ W
        if x.dim() == 4:
            return torch.einsum("bchw,cd->bdhw", x - mean[None, :, None, None], W)
    raise ValueError(f"lda_project expects N×C rows or a B×C×H×W map, got shape {tuple(x.shape)}")


def fit_subclass_centres(z: torch.Tensor, y: torch.Tensor, num_classes: int, k_sub: int = 8,
                         niter: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: per-class K-means on the LDA features -> (centres nc×K_sub×d, degenerate nc×K_sub).

    ``degenerate[c, k]`` marks filler centres of classes with fewer than ``K_sub`` distinct
    locations (see the module docstring).
    """
    d = z.shape[1]
    centres = torch.zeros(num_classes, k_sub, d)
    filler = torch.zeros(num_classes, k_sub, dtype=torch.bool)
    z, y = z.float().cpu(), y.long().cpu()
    order = torch.argsort(y, stable=True)
    z, y = z[order], y[order]
    counts = torch.bincount(y, minlength=num_classes).tolist()
    start = 0
    for c in range(num_classes):
        zc = z[start:start + counts[c]]
        start += counts[c]
        if len(zc) == 0:
            filler[c] = True
            continue
        uniq = torch.unique(zc, dim=0)
        if len(uniq) < k_sub:
            centres[c, :len(uniq)] = uniq
            centres[c, len(uniq):] = uniq[0]
            filler[c, len(uniq):] = True
        else:
            centres[c] = torch.from_numpy(kmeans(zc, k_sub, niter, seed + c))
    return centres, filler


def assign_subclasses(z: torch.Tensor, y: torch.Tensor, centres: torch.Tensor,
                      chunk: int = 65536) -> torch.Tensor:
    """Step 2 / online: ``k* = argmin_k ‖z_i − ρ_{y_i,k}‖²`` over the true class's centres;
    returns the flat sub-class index ``y·K_sub + k*`` (first index wins ties). fp32."""
    y = y.long()
    out = []
    with torch.autocast(device_type=z.device.type, enabled=False):
        for s in range(0, z.shape[0], chunk):
            c = centres.float()[y[s:s + chunk]]                      # n×K_sub×d
            d2 = ((z[s:s + chunk].float()[:, None, :] - c) ** 2).sum(-1)
            out.append(d2.argmin(1))
    k = torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=z.device)
    return y * centres.shape[1] + k


def nearest_prototype(z: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor | None = None,
                      chunk: int = 65536) -> torch.Tensor:
    """Step 4: ``h2(i) = argmin_j ‖z_i − prot_j‖²`` over all (valid) prototypes, labels ignored."""
    p = prototypes.double().to(z.device)
    pn = (p * p).sum(1)
    if valid is not None:
        pn = torch.where(valid.to(z.device), pn, torch.full_like(pn, float("inf")))
    out = []
    for s in range(0, z.shape[0], chunk):
        zz = z[s:s + chunk].double()
        out.append((pn[None, :] - 2.0 * zz @ p.t()).argmin(1))   # ‖z‖² is constant per row
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=z.device)


class DecisionStats:
    """Steps 3-5 from streamed LDA features: prototypes (one pass), then decision counts and the
    score matrix (a second pass). ``centres`` come from :func:`fit_subclass_centres`; empty
    sub-classes are those that receive no location in the prototype pass."""

    def __init__(self, centres: torch.Tensor) -> None:
        self.centres = centres.float()
        nc, k, d = centres.shape
        self.m = nc * k
        self.proto_sums = torch.zeros(self.m, d, dtype=torch.float64)
        self.h1_counts = torch.zeros(self.m, dtype=torch.long)
        self.counts = torch.zeros(self.m, self.m, dtype=torch.long)
        self.prototypes: torch.Tensor | None = None
        self.empty: torch.Tensor | None = None

    def add_prototypes(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Step 3 (accumulate): sums and counts of the LDA features per sub-class h1."""
        h1 = assign_subclasses(z, y.to(z.device), self.centres.to(z.device)).cpu()
        self.proto_sums.index_add_(0, h1, z.detach().cpu().double())
        self.h1_counts += torch.bincount(h1, minlength=self.m)

    def all_reduce_prototypes(self) -> None:
        """Sum the prototype sums and counts of every DDP rank (no-op when single)."""
        from letkd.engine import dist

        dist.all_reduce_sum(self.proto_sums)
        dist.all_reduce_sum(self.h1_counts)

    def all_reduce_decisions(self) -> None:
        """Sum the ``h1 -> h2`` counts of every DDP rank (no-op when single)."""
        from letkd.engine import dist

        dist.all_reduce_sum(self.counts)

    def finish_prototypes(self) -> torch.Tensor:
        """Step 3 (finish): prototypes = means; empty sub-classes keep their centre."""
        self.empty = self.h1_counts == 0
        flat = self.centres.reshape(self.m, -1).double()
        means = self.proto_sums / self.h1_counts.clamp(min=1)[:, None].double()
        self.prototypes = torch.where(self.empty[:, None], flat, means).float()
        return self.prototypes

    def add_decisions(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Steps 4-5 (accumulate): count ``h1 -> h2`` pairs."""
        if self.prototypes is None:
            self.finish_prototypes()
        h1 = assign_subclasses(z, y.to(z.device), self.centres.to(z.device)).cpu()
        h2 = nearest_prototype(z, self.prototypes, ~self.empty).cpu()
        self.counts += torch.bincount(h1 * self.m + h2, minlength=self.m * self.m).reshape(self.m, self.m)

    def score_matrix(self) -> torch.Tensor:
        """Step 5: ``S[a, b] = #{h1=a, h2=b} / #{h1=a}``; rows of empty sub-classes are one-hot on
        themselves. Every row sums to 1."""
        rows = self.counts.sum(1)
        s = self.counts.double() / rows.clamp(min=1)[:, None].double()
        eye = torch.eye(self.m, dtype=torch.float64)
        return torch.where((rows == 0)[:, None], eye, s).float()


def decision_targets(z: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Online target of METHOD §3b: ``S[(y, k*), :]`` with ``k*`` the nearest of the true class's
    ``K_sub`` centres to the LDA feature ``z_i`` (rows N×d) -> N × (K_sub·num_classes)."""
    if z.shape[0] != labels.shape[0]:
        raise ValueError(f"decision_targets: {z.shape[0]} feature rows but {labels.shape[0]} labels")
    return S[assign_subclasses(z, labels, centres)]


class DecisionTargetRows:
    """:func:`decision_targets` one row range at a time (``rows(start, stop)``, the fused KD step's
    :data:`letkd.fused_step.TileTargets`): the sub-class of every row is found once (N integers),
    a tile is its rows of ``S``."""

    def __init__(self, z: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, S: torch.Tensor) -> None:
        if z.shape[0] != labels.shape[0]:
            raise ValueError(f"decision_targets: {z.shape[0]} feature rows but {labels.shape[0]} labels")
        self.S = S.float()
        self.index = assign_subclasses(z, labels, centres)
        self.neg_entropy = torch.special.xlogy(self.S, self.S).sum(1)    # Σ_k S_jk log S_jk per sub-class j

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return self.S[self.index[start:stop]]

    def with_entropy(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and their ``Σ P log P``, from ``Σ_k S_jk log S_jk`` per sub-class ``j``."""
        idx = self.index[start:stop]
        return self.S[idx], self.neg_entropy[idx].sum()
