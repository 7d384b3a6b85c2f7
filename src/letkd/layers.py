"""The KD layer that lets the student decide (METHOD.md §1): its mathematics only.

:class:`KDLayer` is an ordinary ``nn.Module``; it stays in the student at inference. It knows
nothing of architectures: :func:`letkd.models.attach.attach_kd_layers` places it in a student
through the taps (METHOD §2).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from letkd.fused_step import TileTargets, column_moments, fused_kd_step

__all__ = ["CosineConv1x1", "KDLayer", "LocationBatchNorm2d", "normalised_rows_matmul", "kd_layer_extra_params",
           "without_scores"]

EPS = 1e-12  # METHOD §1.1: L2-normalisation eps


class CosineConv1x1(nn.Module):
    """Scaled cosine 1×1 convolution, no bias (METHOD §1 steps 1 and 3).

    ``out[o, i] = scale · <x_i / ‖x_i‖, w_o / ‖w_o‖>`` for every spatial location ``i``: the
    input is L2-normalised over channels and each of the ``out_ch`` weight rows (length
    ``in_ch``) is L2-normalised (eps 1e-12, as ``F.normalize``). ``normalise_weight_rows=False``
    leaves the rows raw (a scaled linear map of the normalised input; not used by the method).

    Parameters: ``weight`` (out_ch × in_ch × 1 × 1, init normal(0, sqrt(2/in_ch))) and the
    scalar ``scale`` (init ``init_scale``).
    """

    def __init__(self, in_ch: int, out_ch: int, init_scale: float,
                 normalise_weight_rows: bool = True, eps: float = EPS) -> None:
        super().__init__()
        if in_ch < 1 or out_ch < 1:
            raise ValueError(f"CosineConv1x1 needs in_ch, out_ch >= 1, got {in_ch}, {out_ch}")
        self.in_ch, self.out_ch = int(in_ch), int(out_ch)
        self.normalise_weight_rows = bool(normalise_weight_rows)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1))
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float | None = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / self.in_ch))
            if init_scale is not None:
                self.scale.fill_(float(init_scale))

    def _weight_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """``scale · w_o/‖w_o‖`` as an out_ch × in_ch matrix. The scalar scale multiplies the
        (small) weight rather than the (large) output: same function and gradients, one pass
        less over the output each way."""
        w = self.weight.flatten(1)
        if self.normalise_weight_rows:
            w = F.normalize(w, p=2.0, dim=1, eps=self.eps)
        return self.scale.to(dtype) * w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×in_ch×H×W -> B×out_ch×H×W."""
        xn = F.normalize(x, p=2.0, dim=1, eps=self.eps)
        w = self._weight_rows(xn.dtype)
        return F.conv2d(xn, w[:, :, None, None])

    def forward_rows(self, rows: torch.Tensor, normalise_input: bool = True) -> torch.Tensor:
        """The same map on locations as rows: N×in_ch -> N×out_ch, one matrix product.

        ``normalise_input=False`` returns ``scale · <x_i, w_o/‖w_o‖>`` for the raw rows; the
        caller divides by ``‖x_i‖`` afterwards, which is cheaper when out_ch < in_ch (the KD
        layer's value step, K -> C): the division then runs over N×C instead of N×K values."""
        xn = F.normalize(rows, p=2.0, dim=1, eps=self.eps) if normalise_input else rows
        return xn @ self._weight_rows(xn.dtype).t()

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, normalise_weight_rows={self.normalise_weight_rows}"


class _NormalisedRowsMatmul(torch.autograd.Function):
    """``y = (p Wᵀ) / max(‖p‖, eps)`` row-wise, with a two-pass backward over the wide ``p``.

    Autograd of the composed ops would make ~5 passes over the N×K ``p`` in backward (division,
    product and mask of the norm's gradient, then adding the matmul's). Here, with ``r`` the
    clamped row norms, ``G`` the output gradient and ``y`` the output:
    ``∂L/∂p = (G/r) W − p · [‖p‖ > eps] · rowsum(G ⊙ y) / (r ‖p‖)`` and ``∂L/∂W = (G/r)ᵀ p``."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(p, dim=1, keepdim=True)
        r = norm.clamp_min(eps)
        y = (p @ w.t()).div_(r)
        ctx.save_for_backward(p, w, norm, r, y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, w, norm, r, y = ctx.saved_tensors
        # small N×C / N×1 factors in fp32, the wide N×K work in p's dtype (autocast-safe)
        gs = g.float() / r.float()
        gp = gw = None
        if ctx.needs_input_grad[0]:
            coef = (gs * y.float()).sum(1, keepdim=True) / norm.float().clamp_min(ctx.eps)
            coef = torch.where(norm > ctx.eps, coef, torch.zeros_like(coef))
            gp = (gs.to(w.dtype) @ w).to(p.dtype)
            gp.addcmul_(p, coef.to(p.dtype), value=-1.0)
        if ctx.needs_input_grad[1]:
            gw = (gs.to(p.dtype).t() @ p).to(w.dtype)
        return gp, gw, None


def normalised_rows_matmul(p: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(p_i / max(‖p_i‖, eps)) · Wᵀ`` for rows ``p`` (N×K) and ``W`` (C×K) -> N×C (METHOD §1 step 3
    with the normalisation applied after the product; identical values and gradients)."""
    return _NormalisedRowsMatmul.apply(p, w, eps)


class LocationBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that also accepts its input as rows: (B·H·W)×C, one row per location.

    Normalising the rows per column uses exactly the statistics of ``BatchNorm2d`` on the
    B×C×H×W map (mean and biased variance over B, H and W; the running variance unbiased over
    B·H·W values), so parameters, buffers, ``state_dict`` and SyncBatchNorm conversion are those
    of ``BatchNorm2d``. 4-D input works as usual."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected (B·H·W)×C rows or a B×C×H×W map (got {input.dim()}-D input)")

    @property
    def uses_batch_stats(self) -> bool:
        """Whether a forward normalises with the batch's statistics (as ``BatchNorm2d.forward``)."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def as_affine(self, batch_mean: torch.Tensor | None = None, batch_var: torch.Tensor | None = None,
               count: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This BN as a per-column affine ``(μ, s, β)`` with ``BN(a) = (a − μ) ⊙ s + β``, ``s = γ/σ``.

        With batch statistics (:attr:`uses_batch_stats`) pass the batch's column mean and biased
        variance over ``count`` rows (differentiable; e.g. from
        :func:`letkd.fused_step.column_moments`): the running statistics are updated exactly as
        ``BatchNorm2d`` does (momentum, or the cumulative average when ``momentum`` is None;
        running variance unbiased over ``count`` rows). Otherwise the running statistics are used
        and the batch moments are not needed. Returned in fp32."""
        if self.uses_batch_stats:
            if batch_mean is None or batch_var is None:
                raise ValueError("LocationBatchNorm2d.as_affine: batch statistics are in use; pass batch_mean and batch_var")
            if count <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got {count} rows")
            if self.training and self.track_running_stats and self.running_mean is not None:
                self._update_running_stats(batch_mean.detach(), batch_var.detach(), count)
            mean, var = batch_mean.float(), batch_var.float()
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        scale = torch.rsqrt(var + self.eps)
        shift = torch.zeros_like(scale)
        if self.affine:
            scale = self.weight.float() * scale
            shift = self.bias.float().expand_as(scale)
        return mean, scale, shift

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """``running ← (1 − f)·running + f·batch`` with ``f`` = momentum (or 1/batches seen), the
        variance unbiased (× count/(count − 1)), as ``BatchNorm2d``."""
        f = 0.0 if self.momentum is None else float(self.momentum)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                f = 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1.0 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1.0 - f).add_(var.to(self.running_var.dtype) * (count / (count - 1)), alpha=f)


class KDLayer(nn.Module):
    """KD layer of METHOD §1: templates → BN-ReLU soft maximiser → value vectors → residual.

    For a feature map ``x`` (B×C×H×W), per location ``i``:

    1. ``a_{k|i} = s1 · cos(x_i, w_k)``            (``templates``, K templates, s1 init 3.0)
    2. ``p̂_i = ReLU(BatchNorm2d_K(a_i))``          (``bn``)
    3. ``v_i = s2 · V̂ (p̂_i / ‖p̂_i‖)``             (``values``, rows of V normalised, s2 init 1.0)
    4. ``x̂_i = x_i + α · v_i``

    ``forward(x)`` returns ``(x_hat, scores)`` with ``scores = a`` (B×K×H×W, pre-BN, not
    detached; a channels-last view of the (B·H·W)×K rows the layer computes in); the scores of the last call are also kept in ``self.last_scores`` for the loss
    (the layer runs inside the student's forward through a hook).

    Training with the fused kernel (:mod:`letkd.fused_step`): inside ``with layer.fused_step(targets_for):``
    a training-mode forward never forms the (B·H·W)×K scores; it computes ``x_hat`` and the
    template loss (``KL(p^T ‖ softmax(a))``, mean over locations, when ``targets_for`` is given)
    in one tiled pass, returns ``(x_hat, None)`` and keeps the loss in ``self.last_loss``
    (``last_scores`` is None). Same values and gradients as the reference path above; eval mode,
    tracing, ``torch.compile`` and a converted ``SyncBatchNorm`` always use the reference path.
    ``α`` is a plain float (not learnt). With ``α = 0`` (QuEST, ablations) the value branch is
    skipped and ``x_hat`` is ``x`` itself; ``bn`` and ``values`` then receive no gradient
    (:func:`letkd.models.attach.attach_kd_layers` freezes them so DDP does not see unused trainable parameters).
    Extra parameters: ``2·C·K + 2·K + 2`` (:func:`kd_layer_extra_params`).
    """

    def __init__(self, channels: int, num_templates: int, alpha: float = 1.0) -> None:
        super().__init__()
        if channels < 1 or num_templates < 1:
            raise ValueError(f"KDLayer needs channels, num_templates >= 1, got {channels}, {num_templates}")
        self.channels, self.num_templates = int(channels), int(num_templates)
        self.alpha = float(alpha)
        self.templates = CosineConv1x1(channels, num_templates, init_scale=3.0)
        self.bn = LocationBatchNorm2d(num_templates)
        self.values = CosineConv1x1(num_templates, channels, init_scale=1.0)
        self.last_scores: torch.Tensor | None = None
        self.last_loss: torch.Tensor | None = None
        self._fused: tuple[Callable[[tuple[int, int]], TileTargets] | None, int | None] | None = None
        self._scoreless = False

    @contextmanager
    def fused_step(self, targets_for: Callable[[tuple[int, int]], TileTargets] | None = None,
                   tile_rows: int | None = None) -> Iterator["KDLayer"]:
        """Within the block, training-mode forwards take the fused kernel (class docstring).

        ``targets_for((H, W))`` gives the :data:`letkd.fused_step.TileTargets` of the soft targets for
        this layer's B·H·W locations (rows in :func:`letkd.targets.extract.to_rows` order); None:
        no loss (an unsupervised layer). ``tile_rows``: rows per tile (None: about 2 MB per
        K-wide fp32 tile on CPU, 64 MB on a GPU: :func:`letkd.fused_step.default_tile_rows`)."""
        if tile_rows is not None and int(tile_rows) < 1:
            raise ValueError(f"KDLayer.fused_step: tile_rows must be >= 1 (or None), got {tile_rows}")
        self._fused, self.last_loss = (targets_for, tile_rows), None
        try:
            yield self
        finally:
            self._fused = None

    @contextmanager
    def without_scores(self) -> Iterator["KDLayer"]:
        """Within the block, eval-mode forwards without autograd return ``(x_hat, None)``: ``x_hat``
        is computed over row tiles (:func:`letkd.fused_step.fused_kd_step` with the running BN
        statistics and no targets), so no (B·H·W)×K tensor is formed, and with ``α = 0`` nothing is
        computed at all. Same ``x_hat`` as the reference path up to fp32 rounding. For loops that
        need only the student's outputs (:func:`letkd.engine.trainer.evaluate` uses it through
        :func:`without_scores`); ``last_scores`` stays None."""
        was, self._scoreless = self._scoreless, True
        try:
            yield self
        finally:
            self._scoreless = was

    def _plain_eager(self) -> bool:
        return (type(self.bn) is LocationBatchNorm2d and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and not torch.compiler.is_compiling())

    def _takes_fused_path(self) -> bool:
        return self._fused is not None and self.training and self._plain_eager()

    def _takes_scoreless_path(self) -> bool:
        return (self._scoreless and not self.training and not torch.is_grad_enabled()
                and not self.bn.uses_batch_stats and self._plain_eager())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.channels):
            raise ValueError(f"KDLayer({self.channels}, {self.num_templates}) expects B×{self.channels}×H×W, "
                             f"got shape {tuple(x.shape)}")
        if self._takes_fused_path():
            self.last_scores = None
            return self._forward_fused(x, *self._fused), None
        if self._takes_scoreless_path():
            self.last_scores = None
            return self._forward_fused(x, None, None), None
        # Every step works on locations as rows ((B·H·W)×C, image-major then row-major): the two
        # 1×1 convolutions become matrix products and the K-wide activations stay in rows, the
        # layout of the template loss, so no layout conversions of the large (B·H·W)×K tensors.
        B, C, H, W = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, C)                 # a view for channels_last x
        a = self.templates.forward_rows(rows)                        # step 1: (B·H·W)×K scores
        scores = a.view(B, H, W, -1).permute(0, 3, 1, 2)             # B×K×H×W view of the rows
        self.last_scores = scores
        if self.alpha == 0.0:
            return x, scores                                         # step 4 with α = 0: value branch unused
        p = F.relu(self.bn(a))                                       # step 2: BN over K, statistics over B·H·W
        # step 3: s2 · V̂ (p̂/‖p̂‖), with the 1/‖p̂‖ applied to the C-wide product (linear, identical)
        v = normalised_rows_matmul(p, self.values._weight_rows(p.dtype), self.values.eps)
        v = v.view(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.alpha * v, scores                            # step 4: residual

    def _forward_fused(self, x: torch.Tensor, targets_for: Callable[[tuple[int, int]], TileTargets] | None,
                       tile_rows: int | None) -> torch.Tensor:
        """Steps 1-4 and the template loss through :func:`letkd.fused_step.fused_kd_step`: the
        normalisations, scales, BN statistics (:func:`column_moments`, running-statistics update)
        and the residual are autograd code here; the N×K work is tiled inside."""
        B, C, H, W = x.shape
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = x.permute(0, 2, 3, 1).reshape(-1, C)
        xn = F.normalize(rows, p=2.0, dim=1, eps=self.templates.eps).to(dtype)      # Xn = X / ‖X‖
        w = self.templates._weight_rows(dtype)                                        # W = s1 · ŵ
        targets = targets_for((H, W)) if targets_for is not None else None
        bn = v = None
        if self.alpha != 0.0:
            mean, var = column_moments(xn, w) if self.bn.uses_batch_stats else (None, None)
            bn = self.bn.as_affine(mean, var, xn.shape[0])                            # (μ, γ/σ, β)
            v = self.values._weight_rows(dtype)                                       # V = s2 · v̂
        elif targets is None:
            return x                                                                  # nothing to compute
        y, self.last_loss = fused_kd_step(xn, w, bn, v, targets, tile_rows, self.values.eps)
        if y is None:
            return x                                                                  # α = 0: x̂ = x
        return x + self.alpha * y.view(B, H, W, C).permute(0, 3, 1, 2)                # step 4: residual

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_templates={self.num_templates}, alpha={self.alpha}"


@contextmanager
def without_scores(model: nn.Module) -> Iterator[nn.Module]:
    """:meth:`KDLayer.without_scores` for every KD layer inside ``model`` (a student with its KD
    layers, or anything holding them): an eval-mode, no-grad forward of ``model`` within the block
    computes its outputs without forming any layer's (B·H·W)×K scores."""
    with ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, KDLayer):
                stack.enter_context(m.without_scores())
        yield model


def kd_layer_extra_params(channels: int, num_templates: int) -> int:
    """Extra parameters of one KD layer: ``2·C·K + 2·K + 2`` (METHOD §1)."""
    return 2 * channels * num_templates + 2 * num_templates + 2
