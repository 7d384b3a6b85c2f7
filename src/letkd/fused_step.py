"""One KD layer's training step, fused and tiled: it never holds a (B·H·W)×K tensor (issue 13).

The reference path (:meth:`letkd.layers.KDLayer.forward` + the method's template loss) writes
every step over the N×K scores (N = B·H·W rows) to memory and saves several of them for the
backward. Here the rows are processed in tiles of ``tile_rows`` rows; per tile, with
``Xn`` the L2-normalised input rows (N×C), ``W = s1·ŵ`` the template rows (K×C),
``V = s2·v̂`` the value rows (C×K) and ``P`` the teacher's soft targets:

1. scores            ``A_t = Xn_t Wᵀ``                                   (METHOD §1 step 1)
2. soft maximiser    ``H_t = ReLU((A_t − μ) ⊙ s + β)``                   (§1 step 2: BN as a per-column affine)
3. values            ``y_t = (H_t Vᵀ) / max(‖H_t‖, eps)`` (row norms)     (§1 step 3)
4. template loss     ``Σ_rows CE(A_t, P_t) + Σ P_t log P_t``             (§3a/§3b, KL; summed, /N at the end)

The forward keeps only N×C / N-sized results (``y``, the row norms ``‖H‖``) and, since the loss
is linear in its incoming gradient, the loss's share of ``∂L/∂Xn`` (N×C) and ``∂L/∂W`` (K×C),
formed there from ``softmax(A_t) − P_t`` while ``P_t`` exists. The backward recomputes ``A_t``
and ``H_t`` tile by tile in ONE pass for the values branch and accumulates the small gradients
(``W``, ``V``, ``μ``, ``s``, ``β``); the targets are evaluated once. Matrix products per tile:
forward ``A``, ``HVᵀ``, the targets' own, ``GW``, ``GᵀXn``; backward ``A``, ``G_s V``,
``G_sᵀH``, ``Gᵀ[Xn, 1]`` (``Σ g Xn`` and ``Σ g`` at once), ``G (s ⊙ W)`` — ten N·C·K products
per supervised layer with values against the reference path's seven, in exchange for no
element-wise pass over a whole N×K tensor. Without values (α = 0) the backward is two scalings.
On CPU the tiles are shared among single-threaded workers (:func:`over_tiles`).

BatchNorm enters as three K-vectors ``(μ, s, β)``, ``s = γ/σ``: with batch statistics they are
differentiable functions of ``Xn`` and ``W`` computed without ``A`` (:func:`column_moments`), so
autograd supplies BN's batch-coupled backward terms through ``μ`` and ``σ`` (K×C / C×C work);
with running statistics they are constants. The residual ``x + α·y``, the normalisation of the
input and of the weight rows, the scales s1, s2 and BN's running-statistics update are plain
autograd / ``no_grad`` code outside (:meth:`letkd.layers.KDLayer.fused_step`).

Precision: the matrix products run in the compute dtype of the inputs (the autocast dtype under
autocast: the caller casts), everything element-wise, the statistics, the loss and the gradient
accumulators in fp32.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

__all__ = ["TileTargets", "default_tile_rows", "row_tiles", "column_moments", "fused_kd_step"]

#: ``targets(start, stop)`` -> rows ``start:stop`` of the soft targets P (fp32, each row a
#: distribution, no grad), called once per tile in the forward. An object may also offer
#: ``with_entropy(start, stop) -> (P rows, Σ P log P over them)`` when it has a cheaper form than
#: ``xlogy`` (:class:`letkd.targets.SoftTargetRows`, :class:`letkd.targets.DecisionTargetRows`).
TileTargets = Callable[[int, int], torch.Tensor]

# Default tile on CPU: one K-wide fp32 array of about 2 MB (128 rows at K = 4096). A tile's
# handful of K-wide temporaries then stay in the last-level cache; much smaller tiles pay the
# per-operation dispatch (about 40 small operations per tile and pass) more than they gain from
# L2. On a GPU the tile only bounds memory (kernel launches want large tiles): 64 MB.
TILE_BYTES = {"cpu": 2 << 20}
TILE_BYTES_OTHER = 64 << 20


def default_tile_rows(num_templates: int, device: torch.device | str = "cpu") -> int:
    """Rows per tile so that one K-wide fp32 tile is about ``TILE_BYTES`` of the device type
    (at least 16 rows)."""
    budget = TILE_BYTES.get(torch.device(device).type, TILE_BYTES_OTHER)
    return max(16, budget // (4 * int(num_templates)))


def row_tiles(n: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row tiles covering ``0:n``; the last one may be shorter."""
    for start in range(0, n, tile_rows):
        yield start, min(n, start + tile_rows)


def column_moments(xn: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and biased variance of the scores ``A = Xn Wᵀ`` without forming ``A`` (fp32,
    differentiable): ``μ = m Wᵀ`` with ``m`` the mean row of ``Xn``, and ``var_k = w_k Σ w_kᵀ``
    with ``Σ = (Xn − 1m)ᵀ(Xn − 1m) / N`` the centred C×C covariance (cost N·C² + K·C²)."""
    with torch.autocast(device_type=xn.device.type, enabled=False):
        xn, w = xn.float(), w.float()
        m = xn.mean(0)
        xc = xn - m
        cov = (xc.t() @ xc) / xn.shape[0]
        return w @ m, ((w @ cov) * w).sum(1).clamp_min(0.0)


# -- the per-tile steps, forward ------------------------------------------------------------------
def tile_scores(xn_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Step 1: ``A_t = Xn_t Wᵀ`` (T×K), product in the compute dtype, returned in fp32."""
    return (xn_t @ w.t()).float()


def soft_maximiser(a: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Step 2: ``H_t = ReLU((A_t − μ) ⊙ s + β) = ReLU(A_t ⊙ s + (β − μ ⊙ s))``; ``offset = β − μ ⊙ s``."""
    return torch.addcmul(offset, a, scale).relu_()


def normalised_values(h: torch.Tensor, v: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """Step 3: ``y_t = (H_t Vᵀ) / max(‖H_t‖, eps)`` written into ``out`` (T×C); returns ``‖H_t‖``."""
    norm = torch.linalg.vector_norm(h, dim=1)
    torch.mm(h.to(v.dtype), v.t(), out=out)
    out.div_(norm.clamp_min(eps).to(out.dtype)[:, None])
    return norm


def template_kl(a: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: ``Σ_i KL(P_i ‖ softmax(A_i)) = Σ_i [lse(A_i) − P_i·A_i] + Σ P log P`` over the tile,
    and its gradient ``softmax(A_t) − P_t`` (rows of P sum to 1). ``a`` is overwritten.

    With ``A'_i = A_i − max A_i`` and ``q = softmax(A')``: ``lse(A'_i) = −log max_k q_ik``, so
    the sum needs no logarithm over the tile."""
    a.sub_(a.amax(1, keepdim=True))                                   # A' = A − max (softmax-invariant)
    q = torch.softmax(a, 1)
    kl = -torch.log(q.amax(1)).sum() - torch.dot(p.reshape(-1), a.reshape(-1)) + neg_entropy
    return kl, q.sub_(p)


# -- the per-tile steps, backward -----------------------------------------------------------------
def values_backward(h: torch.Tensor, norm: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, v: torch.Tensor,
                    eps: float, dv: torch.Tensor) -> torch.Tensor:
    """Step 3 backward, with ``r = max(‖H‖, eps)`` and ``G_s = g_y / r``:
    ``∂L/∂H = G_s V − H ⊙ [‖H‖ > eps] · rowsum(G_s ⊙ y) / ‖H‖`` (returned, fp32) and
    ``∂L/∂V += G_sᵀ H`` into ``dv`` (fp32), as :class:`letkd.layers._NormalisedRowsMatmul`."""
    gs = gy.float() / norm.clamp_min(eps)[:, None]
    coef = (gs * y.float()).sum(1) / norm.clamp_min(eps)
    coef = torch.where(norm > eps, coef, torch.zeros_like(coef))
    if v.dtype == torch.float32:
        dv.addmm_(gs.t(), h)
    else:
        dv += (gs.to(v.dtype).t() @ h.to(v.dtype)).float()
    return (gs.to(v.dtype) @ v).float().addcmul_(h, coef[:, None], value=-1.0)


def accumulate_input_grads(g: torch.Tensor, xn_t: torch.Tensor, w: torch.Tensor, dxn_t: torch.Tensor | None,
                           dw: torch.Tensor | None, add: bool = False) -> None:
    """Through step 1: ``∂L/∂Xn_t (+)= G_t W`` into ``dxn_t`` and ``∂L/∂W += G_tᵀ Xn_t`` into ``dw`` (fp32)."""
    g = g.to(xn_t.dtype)
    if dxn_t is not None:
        if dxn_t.dtype != g.dtype:
            dxn_t.add_(g @ w) if add else dxn_t.copy_(g @ w)
        elif add:
            dxn_t.addmm_(g, w)
        else:
            torch.mm(g, w, out=dxn_t)
    if dw is not None:
        if g.dtype == torch.float32:
            dw.addmm_(g.t(), xn_t)
        else:
            dw += (g.t() @ xn_t).float()


class _FusedKDStep(torch.autograd.Function):
    """Steps 1-4 over row tiles; outputs ``(y or None, mean KL or None)``. See the module docstring.

    The loss is linear in its incoming gradient, so its contribution to ``∂L/∂Xn`` and ``∂L/∂W``
    is formed in the forward, where ``P_t`` and ``softmax(A_t)`` exist anyway (two products per
    tile; N×C and K×C kept), and only scaled in the backward: the targets are never recomputed."""

    @staticmethod
    def forward(ctx, xn, w, centre, scale, shift, v, targets, tile_rows, eps):
        ctx.set_materialize_grads(False)
        n = xn.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        supervised = targets is not None
        f32 = dict(dtype=torch.float32, device=xn.device)
        workers = tile_workers(n, tile_rows, xn.device)
        y = xn.new_empty(n, v.shape[0]) if v is not None else None
        norm = torch.empty(n, **f32) if v is not None else None
        offset = shift - centre * scale if v is not None else None
        dxn_loss = torch.empty(xn.shape, **f32) if supervised and need_x else None
        kl = [torch.zeros((), dtype=torch.float64, device=xn.device) for _ in range(workers)]
        dw_loss = [torch.zeros(w.shape, **f32) for _ in range(workers)] if supervised and need_w else None

        def tile(s: int, e: int, k: int) -> None:
            a = tile_scores(xn[s:e], w)                                              # step 1
            if v is not None:
                h = soft_maximiser(a, scale, offset)                                 # step 2
                norm[s:e] = normalised_values(h, v, eps, out=y[s:e])                 # step 3
            if supervised:
                p, neg_entropy = target_rows(targets, s, e)
                kl_t, g = template_kl(a, p, neg_entropy)                             # step 4
                kl[k] += kl_t
                accumulate_input_grads(g, xn[s:e], w, dxn_loss[s:e] if dxn_loss is not None else None,
                                       dw_loss[k] if dw_loss is not None else None)

        over_tiles(n, tile_rows, workers, tile, xn.device.type)
        loss = (sum(kl) / n).float() if supervised else None
        ctx.save_for_backward(xn, w, centre, scale, shift, v, y, norm, dxn_loss,
                              sum(dw_loss) if dw_loss is not None else None)
        ctx.tile_rows, ctx.eps = tile_rows, eps
        return y, loss

    @staticmethod
    def backward(ctx, gy, gloss):
        xn, w, centre, scale, shift, v, y, norm, dxn_loss, dw_loss = ctx.saved_tensors
        n = xn.shape[0]
        values = v is not None and gy is not None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        f32 = dict(dtype=torch.float32, device=xn.device)
        dxn = torch.zeros(xn.shape, **f32) if need_x else None
        dw = torch.zeros(w.shape, **f32) if need_w else None
        if gloss is not None and (dxn_loss is not None or dw_loss is not None):   # step 4, formed in the forward
            weight = gloss.float() / n
            if need_x:
                torch.mul(dxn_loss, weight, out=dxn)
            if need_w:
                torch.mul(dw_loss, weight, out=dw)
        dv = dcentre = dscale = dshift = None
        if values:
            workers = tile_workers(n, ctx.tile_rows, xn.device)
            offset = shift - centre * scale
            # [Xn, 1]: one product per tile gives Σ_i g_i Xn_i (K×C) and Σ_i g_i (K) together
            xn_aug = torch.cat([xn, xn.new_ones(n, 1)], dim=1)
            sw = (scale[:, None] * w.float()).to(w.dtype)                            # s ⊙ W
            dvs = [torch.zeros(v.shape, **f32) for _ in range(workers)]
            gx_augs = [torch.zeros(w.shape[0], w.shape[1] + 1, **f32) for _ in range(workers)]

            def tile(s: int, e: int, k: int) -> None:
                a = tile_scores(xn[s:e], w)                                          # step 1 again
                h = soft_maximiser(a, scale, offset)                                 # step 2 again
                gh = values_backward(h, norm[s:e], y[s:e], gy[s:e], v, ctx.eps, dvs[k])  # step 3
                g = torch.ops.aten.threshold_backward(gh, h, 0.0)                    # ReLU: g = ∂L/∂(pre-activation)
                accumulate_input_grads(g, xn_aug[s:e], None, None, gx_augs[k])       # Σ g [Xn, 1]
                if need_x:
                    accumulate_input_grads(g, xn[s:e], sw, dxn[s:e], None, add=True)  # ∂L/∂Xn_t += g (s ⊙ W)

            over_tiles(n, ctx.tile_rows, workers, tile, xn.device.type)
            dv, gx_aug = sum(dvs), sum(gx_augs)
            gx, dshift = gx_aug[:, :-1], gx_aug[:, -1]                               # Σ g Xn, ∂L/∂β = Σ g
            dscale = (w.float() * gx).sum(1) - centre * dshift                       # ∂L/∂s = Σ g ⊙ (A − μ)
            dcentre = -scale * dshift                                                # ∂L/∂μ = −s ⊙ Σ g
            if need_w:
                dw.addcmul_(scale[:, None], gx)                                      # ∂L/∂W += s ⊙ Σ g Xn
        return (dxn.to(xn.dtype) if need_x else None, dw.to(w.dtype) if need_w else None, dcentre, dscale, dshift,
                dv.to(v.dtype) if values else None, None, None, None)


# -- running the tiles ----------------------------------------------------------------------------
def tile_workers(n: int, tile_rows: int, device: torch.device) -> int:
    """How many tiles run at once: on CPU, one per intra-op thread (at most one per tile); else 1."""
    tiles = -(-n // tile_rows)
    return max(1, min(torch.get_num_threads(), tiles)) if device.type == "cpu" else 1


def over_tiles(n: int, tile_rows: int, workers: int, body: Callable[[int, int, int], None], device_type: str) -> None:
    """``body(start, stop, k)`` for every row tile, ``k`` the worker (its accumulators).

    On CPU with ``workers`` > 1 the tiles are dealt round-robin to that many Python threads, each
    running single-threaded operations (``torch.set_num_threads(1)`` for the duration): one
    parallel region per tile sequence instead of one per small operation, so the tiles' ~40
    small operations do not each wait on a thread barrier (costly when cores are shared).
    Tensors written by ``body`` must be disjoint per tile or private to ``k``. No grad, autocast off."""
    tiles = list(row_tiles(n, tile_rows))

    def run(k: int) -> None:   # grad and autocast modes are per thread: set them in each
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            for s, e in tiles[k::workers]:
                body(s, e, k)

    if workers <= 1:
        run(0)
        return

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(_pool(workers).map(run, range(workers)))
    finally:
        torch.set_num_threads(threads)


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None   # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """One persistent pool of tile workers (threads keep their BLAS / OpenMP state between calls)."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="letkd-tiles")
    return _POOL


def target_rows(targets: TileTargets, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of P and their ``Σ P log P``: from ``targets.with_entropy`` when the
    targets offer a cheaper form (:class:`letkd.targets.SoftTargetRows`), else ``xlogy``."""
    with_entropy = getattr(targets, "with_entropy", None)
    if with_entropy is not None:
        return with_entropy(start, stop)
    p = targets(start, stop).float()
    return p, torch.special.xlogy(p, p).sum()


def fused_kd_step(xn: torch.Tensor, w: torch.Tensor, bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                  v: torch.Tensor | None, targets: TileTargets | None, tile_rows: int | None = None,
                  eps: float = 1e-12) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The fused, tiled steps 1-4 of one KD layer (module docstring); autograd-aware.

    ``xn``: normalised input rows N×C; ``w``: template rows K×C (``s1·ŵ``); ``bn``: the per-column
    affine ``(μ, s, β)`` (K each, fp32) of step 2, or None with ``v`` None (α = 0: no value
    branch); ``v``: value rows C×K (``s2·v̂``) or None; ``targets``: :data:`TileTargets` or None
    (no loss). ``xn``, ``w`` and ``v`` must share one dtype: the matrix products' compute dtype.
    Returns ``(y N×C or None, mean KL over the N rows (fp32 scalar) or None)``.
    """
    if xn.dim() != 2 or w.dim() != 2 or w.shape[1] != xn.shape[1]:
        raise ValueError(f"fused_kd_step: xn is N×C and w K×C; got {tuple(xn.shape)} and {tuple(w.shape)}")
    if (v is None) != (bn is None):
        raise ValueError("fused_kd_step: pass both the BN affine and the value rows, or neither (α = 0)")
    if v is not None and (v.dim() != 2 or v.shape[1] != w.shape[0] or v.dtype != xn.dtype):
        raise ValueError(f"fused_kd_step: v must be C_out×K ({w.shape[0]}) in {xn.dtype}; got {tuple(v.shape)} {v.dtype}")
    if w.dtype != xn.dtype:
        raise ValueError(f"fused_kd_step: xn and w must share the compute dtype; got {xn.dtype} and {w.dtype}")
    if xn.shape[0] == 0:
        raise ValueError("fused_kd_step: no rows")
    tile = int(tile_rows) if tile_rows else default_tile_rows(w.shape[0], xn.device)
    if tile < 1:
        raise ValueError(f"fused_kd_step: tile_rows must be >= 1, got {tile_rows}")
    centre, scale, shift = (t.float() for t in bn) if bn is not None else (None, None, None)
    return _FusedKDStep.apply(xn.contiguous(), w.contiguous(), centre, scale, shift,
                              v.contiguous() if v is not None else None, targets, tile, float(eps))
