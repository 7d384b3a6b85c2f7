"""The training loop, readable top to bottom: build → (resume) → epochs of train + evaluate →
checkpoint → summary. The loop knows nothing about methods: it calls
``distiller.forward_train`` and sums the loss dict it returns.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import letkd
from letkd import config as cfgmod
from letkd import methods, models
from letkd.config import Config, ConfigError
from letkd.engine import dist
from letkd.engine.checkpoint import load_file, rng_state, save_atomic, set_rng_state
from letkd.engine.logger import MetricsLogger, write_json_atomic
from letkd.layers import without_scores

__all__ = ["run", "build", "Built", "evaluate", "RunDirError", "NonFiniteLoss", "default_run_dir",
           "autocast_context", "resolve_precision", "rebuild_deployable", "build_distiller"]


class RunDirError(RuntimeError):
    """The run directory holds another run (or cannot be resumed)."""


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


# Keys that may differ between a run and its resumption (they do not change the results).
_RESUME_FREE = {"run.dir", "run.overwrite", "run.tensorboard", "train.progress", "train.threads",
                "data.num_workers", "data.root", "teacher.checkpoint", "train.device"}


def default_run_dir(cfg: Config) -> Path:
    teacher = cfg.teacher.name or "none"
    return Path("runs") / cfg.data.name / cfg.method_name / f"{teacher}-{cfg.model.name}" / f"seed{cfg.train.seed}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the device supports it (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _lr_factor(cfg: Config, steps_per_epoch: int):
    """Learning-rate multiplier after ``i`` optimiser steps (the scheduler steps every iteration).

    ``multistep`` (METHOD §4): ×gamma for each milestone epoch already completed — constant
    within an epoch, as RepDistiller's per-epoch schedule. ``cosine``: annealed per iteration
    from 1 to 0 over the whole run. ``warmup_epochs``: linear ramp per iteration first.
    """
    t = cfg.train
    spe = max(int(steps_per_epoch), 1)
    total = spe * t.epochs

    def factor(i: int) -> float:
        epoch = i // spe + 1
        warm = min(1.0, (i + 1) / (spe * t.warmup_epochs)) if t.warmup_epochs else 1.0
        if t.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
        return warm * t.gamma ** sum(epoch > m for m in t.milestones)

    return factor


@dataclass
class Built:
    cfg: Config
    data: Any
    distiller: methods.Distiller
    device: torch.device
    dist: dist.DistInfo
    teacher_fingerprint: str
    params_student: int


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build_teacher(cfg: Config, info: dict[str, Any]) -> tuple[nn.Module | None, str]:
    if not cfg.teacher.name:
        return None, ""
    from letkd.models.weights import fingerprint, load_weights

    kw = {"pretrained": cfg.teacher.pretrained} if cfg.teacher.pretrained else {}
    teacher = models.create(cfg.teacher.name, num_classes=info["num_classes"], in_channels=info["in_channels"],
                            image_size=tuple(info["image_size"]), **kw)
    if cfg.teacher.checkpoint:
        load_weights(teacher, cfg.teacher.checkpoint, arch=cfg.teacher.name)
    elif getattr(teacher, "letkd_new_head", False):
        raise ConfigError(
            f"teacher.pretrained={cfg.teacher.pretrained!r}: the published weights of {cfg.teacher.name} are for another "
            f"number of classes, so its classifier would be untrained ({info['num_classes']} classes here). Fine-tune "
            f"it first (`letkd train-teacher` with model.name={cfg.teacher.name} model.pretrained="
            f"{cfg.teacher.pretrained}) and set teacher.checkpoint to that run's checkpoints/best.pt")
    elif not cfg.teacher.pretrained:
        raise ConfigError(
            f"teacher.name={cfg.teacher.name!r} has no weights: set teacher.checkpoint to a checkpoint file "
            f"(e.g. one written by `letkd train-teacher`, or a RepDistiller {{'model': state_dict}} file) "
            f"or teacher.pretrained to the library's published weights (torchvision:/timm: names: 'default' or "
            f"the path of the published file; torchvision names: a weights enum)")
    return teacher, fingerprint(teacher.state_dict())


def build(cfg: Config, device: torch.device | None = None, dinfo: dist.DistInfo | None = None) -> Built:
    """Data, student, teacher and method for ``cfg`` (no training state)."""
    from letkd import data as datamod

    if device is None or dinfo is None:
        dinfo, device = dist.init(cfg.train.device)
    data = datamod.build(cfg.data, batch_size=cfg.train.batch_size, test_batch_size=cfg.train.test_batch_size,
                         device=device, seed=cfg.train.seed, rank=dinfo.rank, world_size=dinfo.world_size,
                         channels_last=cfg.train.channels_last)
    distiller, fp, n_student = build_distiller(cfg, _info_dict(data.info), device, dinfo)
    return Built(cfg, data, distiller, device, dinfo, fp, n_student)


def _info_dict(info) -> dict[str, Any]:
    return {"name": info.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": list(info.image_size), "num_train": info.num_train, "mean": list(info.mean),
            "std": list(info.std)}


def build_distiller(cfg: Config, info: dict[str, Any], device: torch.device, dinfo: dist.DistInfo,
                    with_teacher_weights: bool = True) -> tuple[methods.Distiller, str, int]:
    """Student (+ optional initial weights), teacher (+ its weights) and the method around them.

    Returns ``(distiller, teacher_fingerprint, params_student)``. With ``with_teacher_weights``
    false the teacher is built with random weights: enough to shape the method's modules when
    a checkpoint's deployable student is rebuilt (see :func:`rebuild_deployable`).
    """
    torch.manual_seed(cfg.train.seed)
    kw = {"pretrained": cfg.model.pretrained} if cfg.model.pretrained else {}
    student = models.create(cfg.model.name, num_classes=info["num_classes"], in_channels=info["in_channels"],
                            image_size=tuple(info["image_size"]), **kw)
    if cfg.model.checkpoint:
        from letkd.models.weights import load_weights

        load_weights(student, cfg.model.checkpoint, arch=cfg.model.name)
    params_student = _count(student)
    if with_teacher_weights:
        teacher, fp = _build_teacher(cfg, info)
    else:
        teacher = models.create(cfg.teacher.name, num_classes=info["num_classes"], in_channels=info["in_channels"],
                                image_size=tuple(info["image_size"])) \
            if cfg.teacher.name else None
        fp = ""
    ctx = methods.Context(num_classes=info["num_classes"], in_channels=info["in_channels"],
                          image_size=tuple(info["image_size"]), num_train=info["num_train"], epochs=cfg.train.epochs,
                          student_arch=cfg.model.name, teacher_arch=cfg.teacher.name or None,
                          device=str(device), extra={"dataset": info["name"], "teacher_fingerprint": fp,
                                                     "data_root": cfg.data.root,
                                                     "train_subset": cfg.data.train_subset})
    params = dict(cfg.method)
    distiller = methods.create(params.pop("name"), student, teacher, ctx, params)
    if cfg.train.sync_bn and dinfo.distributed:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU (gloo) implementation; "
                              "set train.sync_bn=false on CPU (each rank then normalises with its own batch statistics)")
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    distiller.to(device)
    if cfg.train.channels_last:
        distiller.to(memory_format=torch.channels_last)
    return distiller, fp, params_student


def rebuild_deployable(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, Config, dict[str, Any]]:
    """The deployable student of a checkpoint, rebuilt from its config and data info — no
    dataset and no teacher weights needed (a randomly initialised teacher of the right
    architecture only shapes the method's modules; all that the deployed model uses is in
    ``ckpt['model']``). Returns ``(model, config, data_info)``."""
    for key in ("config", "model", "data_info"):
        if key not in ckpt:
            raise ValueError(f"not a letkd checkpoint: key {key!r} is missing (keys: {sorted(ckpt)[:12]}); "
                             f"evaluate/export take a checkpoint written by a letkd run (checkpoints/best.pt or last.pt)")
    cfg = cfgmod.from_dict(ckpt["config"])
    info = ckpt["data_info"]
    cfg.train.channels_last = False
    cfg.model.pretrained = cfg.model.checkpoint = ""  # the checkpoint holds the weights: no download, no file
    distiller, _, _ = build_distiller(cfg, info, torch.device(device), dist.DistInfo(), with_teacher_weights=False)
    model = distiller.deployable()
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model rebuilt from its config: missing keys "
                           f"{missing[:10]}, unexpected keys {unexpected[:10]}")
    model.eval()
    return model, cfg, info


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Top-1 accuracy (%) and mean CE over ``batches``; sums all-reduced across ranks. KD layers
    in ``model`` run without forming their scores (:func:`letkd.layers.without_scores`)."""
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    with without_scores(model):
        for batch in batches:
            images, labels = batch["images"], batch["labels"]
            with autocast_context(precision, device):
                logits = model(images)
            logits = logits.float()
            sums[0] += (logits.argmax(1) == labels).sum()
            sums[1] += nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums[2] += labels.numel()
    dist.all_reduce_sum(sums)
    model.train(was)
    n = max(sums[2].item(), 1.0)
    return {"acc": 100.0 * sums[0].item() / n, "loss": sums[1].item() / n, "count": int(sums[2].item())}


class _TrainStep(nn.Module):
    """Makes ``forward_train`` the forward of a module so DDP can wrap the distiller."""

    def __init__(self, distiller: methods.Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, images, labels, **batch):
        return self.distiller.forward_train(images, labels, **batch)


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, key + ".")
        elif va != vb and key not in _RESUME_FREE:
            out.append(f"{key}: run has {va!r}, now {vb!r}")
    return out


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool) -> bool:
    """Check/clean the run directory; returns True when a checkpoint will be resumed."""
    cfg_file = run_dir / "config.yaml"
    last = run_dir / "checkpoints" / "last.pt"
    if cfg_file.exists():
        if cfg.run.overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            try:
                old = yaml.safe_load(cfg_file.read_text()) or {}
            except (yaml.YAMLError, OSError) as e:
                raise RunDirError(f"cannot resume {run_dir}: {cfg_file} is unreadable ({type(e).__name__}), probably "
                                  f"torn by a crash; use --overwrite to start the run again") from None
            diff = _config_diff(old, cfgmod.to_dict(cfg))
            if diff:
                raise RunDirError(f"cannot resume {run_dir}: its config differs from this one:\n  " + "\n  ".join(diff)
                                  + "\nUse the run's own config.yaml, or another run.dir.")
            return last.exists()
        else:
            raise RunDirError(f"run directory {run_dir} already holds a run (config.yaml). Pass --resume to continue "
                              f"it, --overwrite (run.overwrite=true) to replace it, or choose another run.dir.")
    return False


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (teacher training and every distillation method); returns the summary."""
    t_start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dinfo, device = dist.init(cfg.train.device)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.train.precision, device)
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)
    cfg.run.dir = str(run_dir)
    do_resume, err = False, None
    if dinfo.main:  # only rank 0 touches the run directory; the others learn the outcome
        try:
            do_resume = _prepare_run_dir(cfg, run_dir, resume)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # left by a kill during a write
                stale.unlink(missing_ok=True)
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(yaml.safe_dump(cfgmod.to_dict(cfg), sort_keys=False))
            os.replace(tmp, run_dir / "config.yaml")
        except RunDirError as e:
            err = str(e)
            if not dinfo.distributed:
                raise
    do_resume, err = dist.broadcast_object((do_resume, err))
    if err is not None:
        raise RunDirError(err)

    b = build(cfg, device, dinfo)
    distiller, data = b.distiller, b.data
    distiller.prepare(data, run_dir)
    if cfg.train.compile == "kd_layers":
        try:
            distiller.compile_hot_paths()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    lr = cfg.train.lr * (cfg.train.batch_size / cfg.train.base_batch if cfg.train.lr_rule == "linear" else 1.0)
    params = distiller.trainable_parameters()
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, nesterov=cfg.train.nesterov and cfg.train.momentum > 0,
                          weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, data.steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    start_epoch, best_acc, best_epoch, trained_seconds, trained_images = 1, -1.0, 0, 0.0, 0
    wall_before = 0.0   # wall time of earlier processes of this run, up to their last checkpoint
    last_path = run_dir / "checkpoints" / "last.pt"
    if do_resume:
        ck = load_file(last_path)
        need = {"distiller", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_acc", "best_epoch"}
        if not isinstance(ck, dict) or need - set(ck):
            raise RunDirError(f"{last_path} is not a letkd training checkpoint (missing "
                              f"{sorted(need - set(ck)) if isinstance(ck, dict) else 'everything'}); use the last.pt "
                              f"a run wrote, or --overwrite")
        missing, unexpected = distiller.load_state_dict(ck["distiller"], strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RunDirError(f"{last_path} does not match this run's model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        start_epoch = ck["epoch"] + 1
        best_acc, best_epoch = ck["best_acc"], ck["best_epoch"]
        trained_seconds, trained_images = ck.get("trained_seconds", 0.0), ck.get("trained_images", 0)
        wall_before = ck.get("wall_seconds", 0.0)
        if dinfo.main:
            print(f"resuming {run_dir} from epoch {ck['epoch']}")

    step_module: nn.Module = _TrainStep(distiller)
    if dinfo.distributed:
        step_module = _wrap_ddp(step_module, distiller, data, device, precision, start_epoch)

    logger = MetricsLogger(run_dir, resume_epoch=start_epoch - 1, tensorboard=cfg.run.tensorboard) if dinfo.main else None
    deploy = distiller.deployable()
    last_acc, epoch = None, start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            row = _train_epoch(cfg, step_module, distiller, data, opt, sched, scaler, epoch, device, precision, dinfo)
            trained_seconds += row["train_seconds"]
            trained_images += row["train_images"]
            if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
                _broadcast_buffers(deploy)  # evaluate (and save) rank 0's BatchNorm statistics on every rank
                ev = evaluate(deploy, data.test_batches(), device, precision)
                row.update(test_acc=ev["acc"], test_loss=ev["loss"])
                last_acc = ev["acc"]
                is_best = ev["acc"] > best_acc
                if is_best:
                    best_acc, best_epoch = ev["acc"], epoch
            else:
                is_best = False
            row["best_acc"] = best_acc
            if dinfo.main:
                logger.log(row)
                ck = {"version": letkd.__version__, "epoch": epoch, "config": cfgmod.to_dict(cfg),
                      "model": _cpu_state(deploy), "best_acc": best_acc, "best_epoch": best_epoch,
                      "teacher_fingerprint": b.teacher_fingerprint, "test_acc": row.get("test_acc"),
                      "data_info": _info_dict(data.info)}
                if is_best:
                    save_atomic(ck, run_dir / "checkpoints" / "best.pt")
                if epoch % cfg.run.checkpoint_every == 0 or epoch == cfg.train.epochs:
                    full = dict(ck, distiller=_cpu_state(distiller, skip_prefix="teacher."),
                                optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                                rng=rng_state(), trained_seconds=trained_seconds, trained_images=trained_images,
                                wall_seconds=wall_before + time.time() - t_start)
                    save_atomic(full, last_path)
            dist.barrier()
    finally:
        if logger is not None:
            logger.close()
    if last_acc is None:  # resumed a finished run
        from letkd.engine.logger import read_metrics

        rows = read_metrics(run_dir / "metrics.jsonl")
        last_acc = rows[-1].get("test_acc") if rows else None
    summary = {
        "method": cfg.method_name, "teacher": cfg.teacher.name or None, "student": cfg.model.name,
        "dataset": cfg.data.name, "train_subset": cfg.data.train_subset, "seed": cfg.train.seed,
        "epochs": cfg.train.epochs, "best_acc": best_acc, "last_acc": last_acc, "best_epoch": best_epoch,
        "params_student": b.params_student, "params_extra": _count(deploy) - b.params_student,
        "params_train_only": sum(p.numel() for p in distiller.trainable_parameters()) - _count(deploy),
        "wall_seconds": wall_before + time.time() - t_start, "train_seconds": trained_seconds,
        "images_per_second": trained_images / trained_seconds if trained_seconds else None,
        "precision": precision, "channels_last": cfg.train.channels_last, "device": str(device),
        "world_size": dinfo.world_size, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
        "letkd_version": letkd.__version__, "run_dir": str(run_dir),
    }
    summary = dist.broadcast_object(summary)  # identical on every rank (rank 0's timings)
    if dinfo.main:
        write_json_atomic(summary, run_dir / "summary.json")
    return summary


def _ddp_ignored(distiller: methods.Distiller) -> list[str]:
    """Names (in the ``_TrainStep`` module) that DDP must neither synchronise nor broadcast:
    the frozen teacher, non-persistent buffers (constants derived identically on every rank,
    e.g. letKD's targets) and the buffers of modules with ``ddp_replicated_buffers = True``
    (kept identical by their own collectives, e.g. CRD's memory)."""
    ignore = []
    if distiller.teacher is not None:
        ignore += [f"distiller.teacher.{n}" for n, _ in distiller.teacher.named_parameters()]
        ignore += [f"distiller.teacher.{n}" for n, _ in distiller.teacher.named_buffers()]
    for mname, mod in distiller.named_modules():
        if mname == "teacher" or mname.startswith("teacher."):
            continue
        replicated = getattr(mod, "ddp_replicated_buffers", False)
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is not None and (replicated or bname in mod._non_persistent_buffers_set):
                ignore.append(f"distiller.{mname + '.' if mname else ''}{bname}")
    return ignore


def _has_unused_parameters(distiller: methods.Distiller, data, device: torch.device, precision: str,
                           epoch: int) -> bool:
    """Whether one ``forward_train`` on a small random batch leaves a trainable parameter without
    a gradient (e.g. SimKD never uses the student's own classifier). Parameters, buffers and
    RNG states are restored afterwards. Any failure of the probe answers True (the safe choice)."""
    params = distiller.trainable_parameters()
    state = {k: v.detach().clone() for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}
    was = distiller.training
    cuda = [device] if device.type == "cuda" else []
    info = data.info
    n = max(2, min(4, data.batch_size // max(data.world_size, 1)))
    try:
        with torch.random.fork_rng(devices=cuda):
            distiller.train()
            x = torch.randn(n, info.in_channels, *info.image_size, device=device)
            y = torch.arange(n, device=device) % info.num_classes
            with autocast_context(precision, device):
                _, losses = distiller.forward_train(x, y, index=torch.arange(n, device=device), epoch=epoch)
            sum(v.float() for v in losses.values()).backward()
            unused = [p for p in params if p.grad is None]
        return bool(unused)
    except Exception:  # noqa: BLE001 - a probe that fails must not stop training
        return True
    finally:
        for p in params:
            p.grad = None
        distiller.load_state_dict(state, strict=False)
        distiller.train(was)


def _wrap_ddp(step_module: nn.Module, distiller: methods.Distiller, data, device: torch.device,
              precision: str, epoch: int) -> nn.Module:
    """DDP around ``_TrainStep(distiller)``: the teacher and replicated buffers ignored,
    ``find_unused_parameters`` only when the method leaves some parameter without a gradient
    (all ranks agree: the probe's answer is max-reduced)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(step_module, _ddp_ignored(distiller))
    flag = torch.tensor([float(_has_unused_parameters(distiller, data, device, precision, epoch))], device=device)
    find_unused = bool(dist.all_reduce_max(flag).item())
    return DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def _broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank (no-op when single).
    DDP broadcasts them at the start of each forward, but that forward then updates them with
    the rank's own batch; this makes the evaluated model the one rank 0 saves."""
    if not dist.initialized():
        return
    import torch.distributed as tdist

    for buf in module.buffers():
        if buf is not None:
            tdist.broadcast(buf, src=0)


def _cpu_state(module: nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()
            if not (skip_prefix and k.startswith(skip_prefix))}


def _train_epoch(cfg: Config, step_module: nn.Module, distiller: methods.Distiller, data, opt, sched, scaler,
                 epoch: int, device: torch.device, precision: str, dinfo: dist.DistInfo) -> dict[str, Any]:
    from tqdm.auto import tqdm

    distiller.train()
    lr_start = opt.param_groups[0]["lr"]
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    t0 = time.time()
    bar = tqdm(total=data.steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
               disable=not (cfg.train.progress and dinfo.main), dynamic_ncols=True)
    for step, batch in enumerate(data.train_batches(epoch)):
        images, labels = batch["images"], batch["labels"]
        with autocast_context(precision, device):
            logits, losses = step_module(images, labels, index=batch["index"], epoch=epoch)
        loss = sum(v.float() for v in losses.values())
        finite = torch.isfinite(loss)
        if dinfo.distributed:  # every rank stops together (none is left waiting in backward)
            finite = dist.all_reduce_max((~finite).float().reshape(1))[0] == 0
        if not finite:
            terms = {k: float(v.detach()) for k, v in losses.items()}
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {step}: {terms}. The last good checkpoint is "
                                f"kept; lower train.lr, use train.precision=fp32, or set train.grad_clip.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(distiller.trainable_parameters(), cfg.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        n = labels.numel()
        seen += n
        for k, v in losses.items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        if bar.disable is False and (step % 20 == 0 or step == data.steps_per_epoch - 1):
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen * dinfo.world_size / elapsed:.0f}")
        bar.update(1)
    bar.close()
    seconds = float(dist.all_reduce_max(torch.tensor([time.time() - t0], dtype=torch.float64, device=device))[0])
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys] + [correct, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    dist.all_reduce_sum(vec)
    total = max(vec[-1].item(), 1.0)
    row: dict[str, Any] = {"epoch": epoch, "lr": lr_start}
    for i, k in enumerate(keys):
        row[f"loss_{k}"] = vec[i].item() / total
    row["loss"] = sum(row[f"loss_{k}"] for k in keys)
    row["train_acc"] = 100.0 * vec[-2].item() / total
    row["train_seconds"] = seconds
    row["train_images"] = int(total)
    row["images_per_second"] = total / seconds if seconds > 0 else None
    return row


def _cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
