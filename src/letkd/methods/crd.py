"""``crd``: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Student and teacher pooled embeddings are projected by linear layers to ``feat_dim`` and
L2-normalised (``g_s``, ``g_t``, eq. 19). Scores ``h(u, v) = exp(<u,v>/τ) / Z`` (Z fixed from the
first batch as ``mean(exp(<u,v>/τ)) · N``); for each sample one positive and ``K`` negatives are
scored in both directions (teacher anchor against student memory and vice versa) and the NCE
loss of eq. (18) is applied to each (:func:`letkd.methods.losses.crd_nce_loss`):
``L = ce_weight · CE + weight · (NCE(student anchor) + NCE(teacher anchor))``.

Memory (``memory``):

* ``"bank"`` (the paper's): one slot per training image for each side (``ctx.num_train`` × D);
  positive = the slot of the sample's own dataset index ``batch['index']``; K negatives drawn
  uniformly from other slots (``negatives: other_class`` rejects slots whose stored label equals
  the sample's, like RepDistiller's default ``mode='exact'`` sampler; a slot's label is known
  once it has been written, or from ``prepare(train_data)`` if the data exposes ``targets``).
  After scoring, the sample's slots are updated with momentum:
  ``m ← normalize(μ·m + (1−μ)·v)`` (μ = ``nce_mom``).
* ``"queue"`` (ours, for ImageNet-size data where a per-image bank is too large): a MoCo-style
  FIFO of the ``nce_k`` most recent (detached) embeddings of each side with their labels and
  indices. Negatives = the whole queue, masking entries of the same image (and, with
  ``other_class``, the same label); positive = the detached current embedding of the other side.

Defaults (RepDistiller ``train_student.py`` / mdistiller ``CFG.CRD``): ``feat_dim = 128``,
``nce_k = 16384``, ``nce_t = 0.07``, ``nce_mom = 0.5``, ``weight = 0.8`` (README ``-b 0.8``;
mdistiller FEAT_WEIGHT 0.8), ``ce_weight = 1``; tap ``penultimate`` global-average-pooled (both
use the pooled ``feat[-1]``); memory init uniform in ±1/sqrt(D/3) (RepDistiller ContrastMemory).

DDP (docs/scaling.md): every rank holds the whole memory. Negatives are drawn for the WHOLE
global batch (indices and labels all-gathered; every rank's RNG is seeded alike) and each rank
keeps its rows; the normalisation constants ``Z`` come from the whole global batch; the memory
update writes the all-gathered embeddings of the global batch. So the memory is identical on
every rank and equal to the single-process memory (up to per-rank BatchNorm statistics in the
embeddings), and DDP need not broadcast it (``ddp_replicated_buffers``). Scores and the NCE
loss are computed in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from letkd.config import ConfigError
from letkd.engine import dist
from letkd.methods._common import LossDistiller
from letkd.methods.base import Context, register
from letkd.methods.losses import crd_nce_loss, embedding


class Embed(nn.Module):
    """Linear projection + L2 normalisation (CRD eq. 19)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """Memory of past embeddings of both sides; returns the normalised scores of eq. (18).

    Buffers only (no parameters): they are saved in checkpoints so resumed runs continue
    exactly. ``z`` holds the two normalisation constants (−1 until set). Under DDP the buffers
    are kept identical on every rank by construction (see the module docstring), so the trainer
    leaves them out of DDP's buffer broadcast (``ddp_replicated_buffers``).
    """

    ddp_replicated_buffers = True

    def __init__(self, dim: int, num_data: int, k: int, t: float, momentum: float,
                 mode: str = "bank", negatives: str = "other_class") -> None:
        super().__init__()
        if mode not in ("bank", "queue"):
            raise ValueError(f"crd: memory must be 'bank' or 'queue', got {mode!r}")
        if negatives not in ("other_class", "uniform"):
            raise ValueError(f"crd: negatives must be 'other_class' or 'uniform', got {negatives!r}")
        if num_data <= 0:
            raise ValueError("crd needs the training-set size: set ctx.num_train (> 0)")
        if mode == "bank" and k >= num_data:
            raise ValueError(f"crd: nce_k={k} negatives need a bank larger than num_train={num_data}")
        self.num_data, self.k, self.t, self.momentum = num_data, k, t, momentum
        self.mode, self.negatives = mode, negatives
        size = num_data if mode == "bank" else k
        stdv = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("mem_s", torch.rand(size, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("mem_t", torch.rand(size, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("z", torch.full((2,), -1.0))
        if mode == "queue":
            self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
            self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    # -- bank -----------------------------------------------------------------------------------
    def sample(self, index: torch.Tensor, labels: torch.Tensor, rounds: int = 8) -> torch.Tensor:
        """``B × (1+K)`` bank indices: column 0 the sample itself, then K negatives."""
        b = index.shape[0]
        neg = torch.randint(0, self.num_data, (b, self.k), device=index.device)
        for _ in range(rounds):
            if self.negatives == "other_class":
                bad = (self.labels[neg] == labels[:, None]) | (neg == index[:, None])
            else:
                bad = neg == index[:, None]
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            neg[bad] = torch.randint(0, self.num_data, (n_bad,), device=index.device)
        return torch.cat([index[:, None], neg], 1)

    @torch.no_grad()
    def update_bank(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor,
                    labels: torch.Tensor) -> None:
        """Momentum update of the samples' own slots: ``normalize(μ·m + (1−μ)·v)``."""
        mu = self.momentum
        self.mem_s.index_copy_(0, index, F.normalize(self.mem_s[index] * mu + v_s.detach() * (1 - mu), dim=1))
        self.mem_t.index_copy_(0, index, F.normalize(self.mem_t[index] * mu + v_t.detach() * (1 - mu), dim=1))
        self.labels.index_copy_(0, index, labels)

    # -- queue ----------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        n = min(v_s.shape[0], self.k)
        v_s, v_t, index, labels = v_s[-n:].detach(), v_t[-n:].detach(), index[-n:], labels[-n:]
        pos = (int(self.ptr) + torch.arange(n, device=self.mem_s.device)) % self.k
        self.mem_s[pos], self.mem_t[pos] = v_s, v_t
        self.indices[pos], self.labels[pos] = index, labels
        self.ptr.fill_((int(self.ptr) + n) % self.k)

    # -- scores ---------------------------------------------------------------------------------
    def _normalise(self, out: torch.Tensor, which: int) -> torch.Tensor:
        if float(self.z[which]) < 0:  # same on every rank: z is never rank-local
            if dist.world_size() > 1:  # the mean over the whole global batch
                s = torch.stack([out.detach().double().sum(), torch.tensor(float(out.numel()), dtype=torch.float64,
                                                                             device=out.device)])
                s = dist.all_reduce_sum(s)
                self.z[which] = (s[0] / s[1]).float() * self.num_data
            else:
                self.z[which] = out.detach().mean() * self.num_data
        return out / self.z[which].clone()

    def _global(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor, labels: torch.Tensor):
        """The global batch under DDP: ``(v_s, v_t, index, labels, offset of this rank's rows)``."""
        ids, sizes = dist.all_gather_cat(torch.stack([index, labels], 1), with_sizes=True)
        vv = dist.all_gather_cat(torch.cat([v_s.detach().float(), v_t.detach().float()], 1))
        d = v_s.shape[1]
        return vv[:, :d], vv[:, d:], ids[:, 0], ids[:, 1], sum(sizes[:dist.rank()])

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns ``(scores_s, scores_t, valid)``: ``scores_s`` anchors the student embedding
        against teacher memory, ``scores_t`` the teacher embedding against student memory
        (each ``B × (1+K)``, column 0 positive); ``valid`` masks negatives (queue) or None."""
        distributed = dist.world_size() > 1
        if distributed:
            g_s, g_t, g_index, g_labels, off = self._global(v_s, v_t, index, labels)
        if self.mode == "bank":
            if distributed:  # negatives of the whole global batch (as one process would draw them), our rows
                idx = self.sample(g_index, g_labels)[off:off + index.shape[0]]
            else:
                idx = self.sample(index, labels)
            w_t = self.mem_t[idx].detach()                 # B × (1+K) × D
            w_s = self.mem_s[idx].detach()
            logit_s = torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2)
            logit_t = torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2)
            valid = None
        else:
            logit_s = torch.cat([(v_s * v_t.detach()).sum(1, keepdim=True), v_s @ self.mem_t.t()], 1)
            logit_t = torch.cat([(v_t * v_s.detach()).sum(1, keepdim=True), v_t @ self.mem_s.t()], 1)
            valid = self.indices[None, :] != index[:, None]
            if self.negatives == "other_class":
                valid = valid & (self.labels[None, :] != labels[:, None])
        with torch.autocast(device_type=logit_s.device.type, enabled=False):  # fp32 scores
            out_s = self._normalise(torch.exp(logit_s.float() / self.t), 0)
            out_t = self._normalise(torch.exp(logit_t.float() / self.t), 1)
        if distributed:  # every rank writes the whole global batch: memories stay identical
            v_s, v_t, index, labels = g_s, g_t, g_index, g_labels
        if self.mode == "bank":
            self.update_bank(v_s, v_t, index, labels)
        else:
            self.enqueue(v_s, v_t, index, labels)
        return out_s, out_t, valid


@dataclass
class CRDParams:
    tap: str = "penultimate"        # pooled (RepDistiller / mdistiller use the pooled feat[-1])
    teacher_tap: str = ""           # empty: same name as ``tap``
    feat_dim: int = 128             # RepDistiller --feat_dim 128; mdistiller CRD.FEAT.DIM
    nce_k: int = 16384              # negatives: RepDistiller --nce_k; mdistiller CRD.NCE.K
    nce_t: float = 0.07             # temperature τ: RepDistiller --nce_t; mdistiller CRD.NCE.TEMPERATURE
    nce_mom: float = 0.5            # memory momentum: RepDistiller --nce_m; mdistiller CRD.NCE.MOMENTUM
    memory: str = "bank"            # bank (paper) | queue (MoCo-style FIFO, ours)
    negatives: str = "other_class"  # other_class (RepDistiller mode='exact') | uniform
    weight: float = 0.8             # RepDistiller README -b 0.8; mdistiller CRD.LOSS.FEAT_WEIGHT
    ce_weight: float = 1.0          # RepDistiller -r 1; mdistiller CRD.LOSS.CE_WEIGHT

    def __post_init__(self) -> None:
        if self.memory not in ("bank", "queue"):
            raise ConfigError(f"method.memory={self.memory!r}: choose bank or queue")
        if self.negatives not in ("other_class", "uniform"):
            raise ConfigError(f"method.negatives={self.negatives!r}: choose other_class or uniform")


@register("crd", CRDParams)
class CRD(LossDistiller):
    """Contrastive representation distillation. Extra modules: ``embed_s``, ``embed_t``
    (trained), ``memory`` (buffers). Loss keys: ``ce``, ``crd``. Needs ``batch['index']``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ctx: Context, params: CRDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = params
        s_shape, t_shape = self.tap_pair(params.tap, params.teacher_tap)
        self.embed_s = Embed(s_shape[0], params.feat_dim)
        self.embed_t = Embed(t_shape[0], params.feat_dim)
        self.memory = ContrastMemory(params.feat_dim, ctx.num_train, params.nce_k, params.nce_t,
                                     params.nce_mom, params.memory, params.negatives)

    def prepare(self, train_data: Any, run_dir: Any = None) -> None:
        """Fill the bank's labels from ``train_data.targets`` / ``.labels`` when available."""
        targets = getattr(train_data, "targets", None)
        if targets is None:
            targets = getattr(train_data, "labels", None)
        if targets is not None and self.params.memory == "bank":
            targets = torch.as_tensor(targets, dtype=torch.long).flatten()
            if targets.numel() == self.memory.labels.numel():
                self.memory.labels.copy_(targets.to(self.memory.labels.device))

    def distill_losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                       **batch: Any) -> dict[str, torch.Tensor]:
        index = batch.get("index")
        if index is None:
            raise KeyError("crd needs batch['index'] (int64 dataset indices of the samples)")
        index = index.to(device=labels.device, dtype=torch.long)
        v_s = self.embed_s(embedding(self.s_feats[self.params.tap]))
        v_t = self.embed_t(embedding(self.t_feats[self.t_name]))
        out_s, out_t, valid = self.memory(v_s, v_t, index, labels)
        n = self.ctx.num_train
        loss = crd_nce_loss(out_s, n, valid) + crd_nce_loss(out_t, n, valid)
        return {"crd": self.params.weight * loss}
