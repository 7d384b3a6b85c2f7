"""letKD-1, letKD-2 and QuEST: the KD layer that lets the student decide (METHOD.md).

* ``letkd2``: an intermediate KD layer (``K = k_sub · num_classes``, supervised by the teacher's
  decisions, Alg. 2) and a penultimate KD layer (``K = k_penult``, supervised by the teacher's
  codebook, Alg. 1); ``L = CE + λ_p L_penult + λ_i L_inter`` (Alg. 3, METHOD §3c).
* ``letkd1``: the penultimate layer only.
* ``quest``: the penultimate layer only with ``α = 0`` (QuEST, ECCV 2020).

Every ablation of METHOD §3c is a parameter: ``use_*`` (layer present), ``alpha_*`` (residual
weight), ``supervise_*`` (loss on its scores or not: "capacity control").

Targets: the offline statistics live in one artifact file (:mod:`letkd.targets.artifact`).
``prepare(data)`` loads it when its metadata matches this run, else fits and saves it
(:func:`ensure_targets`). Default location (when ``targets`` is empty):
``<targets_dir or $LETKD_TARGETS_DIR or <data root>/letkd_targets>/<teacher>-<fingerprint>-
<dataset>-<parts>-<hash of the metadata>.pt``, so every (teacher, dataset, taps, K, ...)
combination has its own cached file shared by all runs and seeds. The targets are
non-persistent buffers of the distiller: the student checkpoint does not contain them and the
deployed student (with its KD layers) never needs them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from letkd.layers import KDLayer
from letkd.methods.base import Context, Distiller, register
from letkd.models.attach import KDLayerSpec, attach_kd_layers
from letkd.models.taps import feature_shapes, resolve
from letkd.targets.artifact import load_targets, save_targets, teacher_fingerprint
from letkd.fused_step import TileTargets
from letkd.targets.codebook import SoftTargetRows, soft_targets
from letkd.targets.decisions import DecisionTargetRows, decision_targets, lda_project
from letkd.targets.extract import pool_to_size, to_rows
from letkd.targets.fit import fit_targets, lda_dimension

__all__ = ["LetKDParams", "LetKD1Params", "QuestParams", "LetKD", "LetKD1", "Quest",
           "template_kl_loss", "targets_path_for", "ensure_targets", "expected_meta"]


KERNELS = ("fused", "reference")


@dataclass
class LetKDParams:
    """Hyper-parameters of letKD-2 (defaults: the paper's CIFAR-100 setting)."""

    use_penult: bool = True               # penultimate KD layer present
    use_inter: bool = True                # intermediate KD layer present (letKD-2)
    alpha_penult: float = 1.0             # residual weight α of each layer (0: QuEST-style)
    alpha_inter: float = 1.0
    supervise_penult: bool = True         # False: layer without loss ("capacity control")
    supervise_inter: bool = True
    k_penult: int = 4096                  # K of the teacher codebook / penultimate templates
    k_sub: int = 8                        # sub-classes per class; K_inter = k_sub · num_classes
    tau: float = 1.0                      # codebook target temperature (METHOD §3a)
    lambda_penult: float = 1.0            # loss weights λ_p, λ_i
    lambda_inter: float = 1.0
    lda_dim: int = 60                     # d = min(lda_dim, C_t, num_classes − 1)
    kmeans_iters: int = 20
    max_samples: int = 0                  # cap on K-means inputs (0: every location)
    kd_weight: float = 0.0                # optional Hinton logit-KD term (off in the paper)
    kd_T: float = 4.0
    ce_weight: float = 1.0
    targets: str = ""                     # targets artifact path ("" : cached default location)
    targets_dir: str = ""                 # folder of cached artifacts ("" : $LETKD_TARGETS_DIR or <data root>/letkd_targets)
    target_seed: int = 0                  # K-means seed of the offline fit
    fit_batch_size: int = 256             # batch size of the offline teacher passes
    teacher_fp32: bool = True             # teacher forward outside autocast: targets match the fp32 offline fit
    kernel: str = "fused"                 # KD layers + template losses: fused (tiled, letkd.fused_step) | reference
    tile_rows: int = 0                    # rows per tile of the fused kernel (0: ~2 MB per K-wide fp32 tile on CPU, 64 MB on GPU)
    student_penult_tap: str = "penultimate"
    student_inter_tap: str = "last_stage_first_block"
    teacher_penult_tap: str = "penultimate"
    teacher_inter_tap: str = "last_stage_first_block"

    def __post_init__(self) -> None:
        for name in ("k_penult", "k_sub", "lda_dim", "kmeans_iters", "fit_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"method.kernel must be one of {list(KERNELS)}, got {self.kernel!r}")
        for name in ("max_samples", "tile_rows", "tau", "lambda_penult", "lambda_inter", "kd_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_T <= 0:
            raise ValueError(f"method.kd_T must be > 0, got {self.kd_T}")
        if not (self.use_penult or self.use_inter):
            raise ValueError("method: at least one of use_penult / use_inter must be true")


@dataclass
class LetKD1Params(LetKDParams):
    """letKD-1: the penultimate KD layer only."""

    use_inter: bool = False


@dataclass
class QuestParams(LetKDParams):
    """QuEST: penultimate templates supervised by the codebook, no value vectors (α = 0)."""

    use_inter: bool = False
    alpha_penult: float = 0.0


def template_kl_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``KL(p^T ‖ softmax(a))`` summed over templates, averaged over all B·H·W locations
    (METHOD §3a/§3b losses). ``scores``: B×K×H×W; ``targets``: (B·H·W)×K rows in
    :func:`letkd.targets.extract.to_rows` order. fp32."""
    a = to_rows(scores).float()
    if a.shape != targets.shape:
        raise ValueError(f"template_kl_loss: scores give {tuple(a.shape)} rows, targets {tuple(targets.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        p = targets.float()
        # KL(p ‖ q) = CE(p, q) − H(p). The soft-target cross-entropy is one fused op with the
        # gradient softmax(a) − p; H(p) does not depend on the student, so it is computed
        # without autograd (it only makes the logged value the KL itself).
        ce = F.cross_entropy(a, p, reduction="sum")
        with torch.no_grad():
            neg_entropy = torch.special.xlogy(p, p).sum()
        return (ce + neg_entropy) / a.shape[0]


def penult_template_loss(scores: torch.Tensor, t: torch.Tensor, centroids: torch.Tensor, tau: float) -> torch.Tensor:
    """Penultimate template loss (METHOD §3a): codebook targets ``softmax(−‖t−ρ‖²/τ)`` of the
    teacher map ``t`` (B×D×H×W, already at the student's size), then :func:`template_kl_loss`."""
    return template_kl_loss(scores, soft_targets(to_rows(t), centroids, tau))


def inter_template_loss(scores: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                        W: torch.Tensor, centres: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Intermediate template loss (METHOD §3b): LDA projection of the teacher map ``t``, sub-class
    decisions scored by ``S`` for each location's image label, then :func:`template_kl_loss`."""
    z = lda_project(to_rows(t), mean, W)
    y = labels.repeat_interleave(scores.shape[-2] * scores.shape[-1])
    return template_kl_loss(scores, decision_targets(z, y, centres, S))


def _hinton_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Optional logit KD term (Hinton 2015): ``T² KL(softmax(t/T) ‖ softmax(s/T))``, batch mean."""
    return F.kl_div(F.log_softmax(s_logits.float() / T, 1), F.softmax(t_logits.float() / T, 1),
                    reduction="batchmean") * T * T


def _check_maps(who: str, taps: dict[str, str], paths: dict[str, str], shapes: dict[str, Any]) -> None:
    """KD layers (and their targets) work on C×H×W feature maps: name a tap that gives anything else."""
    for role, path in paths.items():
        shape = tuple(shapes[role])
        if len(shape) != 3:
            raise ValueError(
                f"method.{who}_{role}_tap={taps[role]!r} (module {path!r}) outputs features of shape {shape} per "
                f"image; a KD layer needs a C×H×W feature map (4-D batch). Choose a convolutional module "
                f"(`letkd taps MODEL --all` lists the module paths)")


@register("letkd2", LetKDParams)
class LetKD(Distiller):
    """letKD (METHOD.md): KD layers attached in the student, targets from the teacher (Alg. 3).

    ``self.kd`` maps ``"inter"`` / ``"penult"`` to the attached :class:`KDLayer` (the modules
    live in ``student.kd_layers``). Losses of ``forward_train``: ``ce``, ``penult``, ``inter``
    and optionally ``kd``, already weighted.
    """

    ROLES = ("inter", "penult")  # attachment order: intermediate before penultimate (METHOD §2)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, ctx: Context, params: LetKDParams) -> None:
        super().__init__(student, teacher, ctx)
        self.params = p = params
        used = {"inter": p.use_inter, "penult": p.use_penult}
        self.supervised = {r: used[r] and getattr(p, f"supervise_{r}") for r in self.ROLES}
        if teacher is None and (any(self.supervised.values()) or p.kd_weight > 0):
            raise ValueError(f"method {self.method_name} needs a teacher: set teacher.name")
        s_taps = {"inter": p.student_inter_tap, "penult": p.student_penult_tap}
        self.s_paths = {r: resolve(student, s_taps[r], ctx.student_arch) for r in self.ROLES if used[r]}
        s_shapes = feature_shapes(student, self.s_paths, ctx.input_shape)
        _check_maps("student", s_taps, self.s_paths, s_shapes)
        k = {"inter": p.k_sub * ctx.num_classes, "penult": p.k_penult}
        alpha = {"inter": p.alpha_inter, "penult": p.alpha_penult}
        specs = {r: KDLayerSpec(self.s_paths[r], k[r], alpha[r], channels=s_shapes[r][0])
                 for r in self.ROLES if used[r]}
        self.kd: dict[str, KDLayer] = attach_kd_layers(student, None, specs)
        self.s_sizes = {r: tuple(s_shapes[r][1:]) for r in self.s_paths}

        t_taps = {"inter": p.teacher_inter_tap, "penult": p.teacher_penult_tap}
        self.t_names = {r: t_taps[r] for r in self.ROLES if self.supervised[r]}
        self.t_paths: dict[str, str] = {}
        self.t_channels: dict[str, int] = {}
        self.t_pools: dict[str, tuple[int, int] | None] = {}
        if self.t_names:
            t_shapes = self.teacher_tap(sorted(set(self.t_names.values())))
            _check_maps("teacher", self.t_names, {r: resolve(teacher, n, ctx.teacher_arch) for r, n in self.t_names.items()},
                        {r: t_shapes[n] for r, n in self.t_names.items()})
            for r, name in self.t_names.items():
                self.t_paths[r] = resolve(teacher, name, ctx.teacher_arch)
                self.t_channels[r] = int(t_shapes[name][0])
                self.t_pools[r] = self.s_sizes[r] if tuple(t_shapes[name][1:]) != self.s_sizes[r] else None
        for name in ("centroids", "lda_mean", "lda_W", "sub_centres", "score_matrix"):
            self.register_buffer(name, None, persistent=False)
        self.targets_meta: dict[str, Any] | None = None
        self._penult_loss, self._inter_loss = penult_template_loss, inter_template_loss

    def compile_hot_paths(self) -> None:
        """``train.compile=kd_layers``: compile each KD layer in place (``nn.Module.compile``: the
        state_dict keys do not change) and the two target + loss functions with ``torch.compile``.
        Inductor fuses the element-wise passes over the (B·H·W)×K activations (BN, ReLU, softmax,
        cross-entropy) that dominate the reference kernel's cost in eager mode (docs/scaling.md).
        Compiles the reference kernel only: the fused kernel already keeps those passes on tiles."""
        if self.params.kernel != "reference":
            raise ValueError("train.compile=kd_layers compiles the reference KD-layer kernel; add method.kernel=reference "
                             "(or keep the default fused kernel and set train.compile=none)")
        _scalar_inductor_if_aten_vectors_off()
        for layer in self.kd.values():
            layer.compile()
        self._penult_loss = torch.compile(penult_template_loss)
        self._inter_loss = torch.compile(inter_template_loss)

    # -- targets ------------------------------------------------------------------------------
    @property
    def needs_targets(self) -> bool:
        return any(self.supervised.values())

    def set_targets(self, targets: dict[str, Any]) -> None:
        """Install a targets dict (artifact contents) as buffers, checking the shapes."""
        dev = next(self.student.parameters()).device
        if self.supervised["penult"]:
            part = targets.get("penult")
            if part is None:
                raise ValueError("targets have no penultimate codebook but this method needs it")
            c = part["centroids"]
            want = (self.params.k_penult, self.t_channels["penult"])
            if tuple(c.shape) != want:
                raise ValueError(f"codebook has shape {tuple(c.shape)}, expected {want}")
            self.centroids = c.float().to(dev)
        if self.supervised["inter"]:
            part = targets.get("inter")
            if part is None:
                raise ValueError("targets have no intermediate decisions but this method needs them")
            m = self.params.k_sub * self.ctx.num_classes
            if tuple(part["S"].shape) != (m, m) or part["W"].shape[0] != self.t_channels["inter"]:
                raise ValueError(f"decision targets have S {tuple(part['S'].shape)} and W {tuple(part['W'].shape)}; "
                                 f"expected S ({m}, {m}) and W ({self.t_channels['inter']}, d)")
            self.lda_mean = part["mean"].float().to(dev)
            self.lda_W = part["W"].float().to(dev)
            self.sub_centres = part["centres"].float().to(dev)
            self.score_matrix = part["S"].float().to(dev)
        self.targets_meta = dict(targets.get("meta", {}))

    def prepare(self, train_data: Any, run_dir: Any = None) -> None:
        """Load or fit the teacher targets (METHOD §3) before training."""
        if self.needs_targets:
            ensure_targets(self, train_data, targets_path_for(self, train_data, run_dir))

    # -- training -----------------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Alg. 3: ``L = ce·CE + λ_p KL_penult + λ_i KL_inter (+ kd)``, one teacher forward."""
        p = self.params
        if self.needs_targets and self.targets_meta is None:
            raise RuntimeError(f"{self.method_name}: teacher targets are not loaded; call prepare(data) "
                               "(or set_targets(load_targets(path))) before training")
        t_logits = None
        if self.t_names or p.kd_weight > 0:
            with torch.autocast(device_type=images.device.type, enabled=not p.teacher_fp32):
                t_logits = self.teacher_forward(images)
        with ExitStack() as fused:
            if p.kernel == "fused":  # the KD layers compute their template losses during the student's forward
                for role, layer in self.kd.items():
                    targets_for = self._tile_targets(role, labels) if self.supervised[role] else None
                    fused.enter_context(layer.fused_step(targets_for, p.tile_rows or None))
            logits = self.student(images)
        losses = {"ce": p.ce_weight * F.cross_entropy(logits, labels)}
        weight = {"penult": p.lambda_penult, "inter": p.lambda_inter}
        for role in ("penult", "inter"):
            if not self.supervised[role]:
                continue
            layer = self.kd[role]
            if layer.last_loss is not None:                      # fused kernel
                losses[role] = weight[role] * layer.last_loss
            elif role == "penult":                               # reference kernel: loss on the scores
                a = self._scores("penult")
                t = pool_to_size(self.t_feats[self.t_names["penult"]], a.shape[-2:])
                losses["penult"] = p.lambda_penult * self._penult_loss(a, t, self.centroids, p.tau)
            else:
                a = self._scores("inter")
                t = pool_to_size(self.t_feats[self.t_names["inter"]], a.shape[-2:])
                losses["inter"] = p.lambda_inter * self._inter_loss(a, t, labels, self.lda_mean, self.lda_W,
                                                                     self.sub_centres, self.score_matrix)
        for layer in self.kd.values():
            layer.last_scores = layer.last_loss = None  # do not hold the graph beyond this step
        if p.kd_weight > 0:
            losses["kd"] = p.kd_weight * _hinton_kd(logits, t_logits, p.kd_T)
        return logits, losses

    def _tile_targets(self, role: str, labels: torch.Tensor) -> Callable[[tuple[int, int]], TileTargets]:
        """The soft targets of ``role`` for the fused kernel, as a function of the layer's H×W:
        the teacher map of this batch pooled to H×W, then codebook softmax rows (penultimate,
        :class:`SoftTargetRows`) or rows of ``S`` for each location's sub-class (intermediate,
        :class:`DecisionTargetRows`); a tile's rows are formed only when the kernel asks."""
        t = self.t_feats[self.t_names[role]]
        if role == "penult":
            return lambda hw: SoftTargetRows(to_rows(pool_to_size(t, hw)), self.centroids, self.params.tau)

        def inter(hw: tuple[int, int]) -> TileTargets:
            z = lda_project(to_rows(pool_to_size(t, hw)), self.lda_mean, self.lda_W)
            return DecisionTargetRows(z, labels.repeat_interleave(hw[0] * hw[1]), self.sub_centres, self.score_matrix)
        return inter

    def _scores(self, role: str) -> torch.Tensor:
        a = self.kd[role].last_scores
        if a is None:
            raise RuntimeError(f"the {role} KD layer did not run in the student's forward")
        return a

    def extra_modules(self) -> dict[str, nn.Module]:
        """The KD layers (inside the student, kept at inference)."""
        return {f"kd_layers.{r}": m for r, m in self.kd.items()}


@register("letkd1", LetKD1Params)
class LetKD1(LetKD):
    """letKD-1: penultimate KD layer only."""


@register("quest", QuestParams)
class Quest(LetKD):
    """QuEST: penultimate templates + codebook loss, α = 0."""


# -- the targets artifact for a distiller ---------------------------------------------------------
def _info(data: Any) -> Any:
    info = getattr(data, "info", None)
    if info is None:
        raise ValueError("prepare(data): data must have an `info` (name, num_train) for the targets metadata")
    return info


def expected_meta(distiller: LetKD, data: Any) -> dict[str, Any]:
    """The metadata a targets artifact must have to be used by ``distiller`` on ``data``."""
    p, info = distiller.params, _info(data)
    inter, penult = distiller.supervised["inter"], distiller.supervised["penult"]
    meta: dict[str, Any] = {
        "teacher_arch": distiller.ctx.teacher_arch,
        "teacher_fingerprint": teacher_fingerprint(distiller.teacher),
        "penult_path": distiller.t_paths.get("penult"), "inter_path": distiller.t_paths.get("inter"),
        "penult_pool": list(distiller.t_pools["penult"]) if penult and distiller.t_pools["penult"] else None,
        "inter_pool": list(distiller.t_pools["inter"]) if inter and distiller.t_pools["inter"] else None,
        "num_classes": int(distiller.ctx.num_classes),
        "k_penult": int(p.k_penult) if penult else None,
        "k_sub": int(p.k_sub) if inter else None,
        "lda_dim": lda_dimension(p.lda_dim, distiller.t_channels["inter"], distiller.ctx.num_classes) if inter else None,
        "kmeans_iters": int(p.kmeans_iters), "max_samples": int(p.max_samples), "seed": int(p.target_seed),
        "dataset": str(getattr(info, "name", "")), "num_train": int(getattr(info, "num_train", 0)),
    }
    for key in ("train_subset", "subset_seed"):   # present on the data object when it was subset
        v = getattr(data, key, None)
        if v is not None:
            meta[key] = v
    return meta


def targets_path_for(distiller: LetKD, data: Any, run_dir: Any = None) -> Path:
    """Where the targets of ``distiller`` on ``data`` live: ``params.targets`` if set, else a
    cached file named by teacher, fingerprint, dataset and a hash of the metadata in
    ``params.targets_dir`` / ``$LETKD_TARGETS_DIR`` / ``<data root>/letkd_targets``."""
    p = distiller.params
    if p.targets:
        return Path(p.targets)
    meta = expected_meta(distiller, data)
    folder = p.targets_dir or os.environ.get("LETKD_TARGETS_DIR") or ""
    if not folder:
        root = getattr(data, "root", None) or (Path(run_dir).parent if run_dir is not None else "data")
        folder = str(Path(root) / "letkd_targets")
    parts = "+".join(r for r in ("penult", "inter") if distiller.supervised[r])
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:10]
    stem = f"{meta['teacher_arch']}-{str(meta['teacher_fingerprint'])[:12]}-{meta['dataset']}-{parts}-{digest}"
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.+-]", "_", stem) + ".pt")


def ensure_targets(distiller: LetKD, data: Any, path: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Load the targets artifact at ``path`` if its metadata matches, else fit it on
    ``data.plain_train_batches`` and save it there; install it in ``distiller``; return it.

    A mismatching or unreadable file at an explicitly chosen path (``method.targets``) is an
    error; at the default cache path it is re-fitted and replaced (with a message).

    Under DDP (``data.world_size > 1``, every rank calls this with its sharded ``data``): rank 0
    alone reads the file and decides; if it must be fitted, every rank streams its shard and
    :func:`letkd.targets.fit.fit_targets` reduces the statistics (K-means on rank 0); rank 0
    saves the artifact and sends its contents to the other ranks (no shared filesystem needed).
    """
    from letkd.engine import dist

    path = Path(path) if path is not None else targets_path_for(distiller, data)
    want = expected_meta(distiller, data)
    distributed = getattr(data, "world_size", 1) > 1 and dist.world_size() > 1

    def _load() -> dict[str, Any] | None:
        if path.is_file():
            try:
                return load_targets(path, want)
            except ValueError as e:
                if distiller.params.targets:
                    raise
                print(f"[letkd] re-fitting targets: {e}", file=sys.stderr)
        return None

    targets = dist.on_main(_load) if distributed else _load()
    if targets is not None:
        distiller.set_targets(targets)
        return targets
    p = distiller.params
    extra = {k: want[k] for k in ("dataset", "num_train", "train_subset", "subset_seed") if k in want}
    extra["tau"] = p.tau  # recorded for information; it only acts online
    targets = fit_targets(
        distiller.teacher, distiller.ctx.teacher_arch, lambda: data.plain_train_batches(p.fit_batch_size),
        penult_path=distiller.t_paths.get("penult"), inter_path=distiller.t_paths.get("inter"),
        penult_pool=distiller.t_pools.get("penult"), inter_pool=distiller.t_pools.get("inter"),
        num_classes=distiller.ctx.num_classes, k_penult=p.k_penult, k_sub=p.k_sub, lda_dim=p.lda_dim,
        kmeans_iters=p.kmeans_iters, max_samples=p.max_samples or None, seed=p.target_seed,
        progress=progress and dist.is_main(), teacher_fingerprint=want["teacher_fingerprint"], meta=extra,
        distributed=distributed)
    if distributed:  # rank 0's artifact, exactly, on every rank
        targets = dist.on_main(lambda: (save_targets(path, targets), targets)[1])
    else:
        save_targets(path, targets)
    distiller.set_targets(targets)
    return targets


def _scalar_inductor_if_aten_vectors_off() -> None:
    """With ``ATEN_CPU_CAPABILITY=default`` (ATen's vectorised CPU kernels off) torch 2.14's
    Inductor still emits ``at::vec`` reductions that its C++ build then rejects ("'at::vec' has
    not been declared"); scalar code generation (``cpp.simdlen = 1``) compiles and computes the same."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "default":
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = 1
