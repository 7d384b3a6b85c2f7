"""torch.distributed plumbing: launched by ``torchrun``, nothing home-made.

Under ``torchrun --nproc_per_node=N`` the environment holds RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init` starts the process group (NCCL on CUDA, gloo on CPU). A plain ``python`` /
``letkd`` process is world size 1 and needs no process group: every helper here is then a
no-op (or the identity), so callers never branch on the world size.

CPU-side collectives (targets statistics, sampled rows, Python objects) go through
:func:`cpu_group`, a gloo group with a long timeout: rank 0 may run a K-means for a long time
while the other ranks wait.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist

__all__ = ["DistInfo", "init", "initialized", "world_size", "rank", "all_reduce_sum", "all_reduce_max",
           "all_gather_cat", "gather_cat", "barrier", "is_main", "shutdown", "broadcast_object", "on_main",
           "cpu_group", "DistributedError"]

# Long collective timeout for the CPU group (rank 0 fits K-means while the others wait).
CPU_GROUP_TIMEOUT = timedelta(minutes=float(os.environ.get("LETKD_DIST_TIMEOUT_MIN", "360")))
_CPU_GROUP: Any = None


class DistributedError(RuntimeError):
    """Raised on every rank when the work of one rank (e.g. rank 0's K-means) failed."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Start the process group if launched by torchrun (idempotent); pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
    if dev.type == "cuda":
        if world > 1 and local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible; "
                               f"use --nproc_per_node <= the number of GPUs per node")
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank_, world, local), dev


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def rank() -> int:
    return tdist.get_rank() if initialized() else 0


def cpu_group():
    """A gloo process group (long timeout) for collectives on CPU tensors and Python objects.

    Created on first use; every rank must reach the first call (it is collective). None when
    not distributed."""
    global _CPU_GROUP
    if not initialized():
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = tdist.new_group(backend="gloo", timeout=CPU_GROUP_TIMEOUT)
    return _CPU_GROUP


def _group_for(t: torch.Tensor):
    """The default group for tensors its backend handles, else the gloo CPU group."""
    if t.device.type == "cpu" and tdist.get_backend() != "gloo":
        return cpu_group()
    return None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a process group)."""
    if initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=_group_for(t))
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks, in place (no-op without a process group)."""
    if initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_group_for(t))
    return t


def _sizes(n: int, device: torch.device, group) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    return [int(s) for s in sizes]


def all_gather_cat(t: torch.Tensor, with_sizes: bool = False):
    """Concatenate ``t`` (along dim 0) from every rank, in rank order, on every rank.

    Ranks may hold different numbers of rows (the last, uneven batch of an epoch): rows are
    padded to the largest count for ``all_gather`` and trimmed after. No gradient flows back.
    Identity when not distributed. With ``with_sizes`` returns ``(cat, rows per rank)``.
    """
    if not initialized():
        return (t, [t.shape[0]]) if with_sizes else t
    group = _group_for(t)
    t = t.detach().contiguous()
    sizes = _sizes(t.shape[0], t.device, group)
    m = max(sizes)
    if m != t.shape[0]:
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        t = torch.cat([t, pad])
    out = [torch.empty_like(t) for _ in sizes]
    tdist.all_gather(out, t, group=group)
    cat = torch.cat([o[:n] for o, n in zip(out, sizes)])
    return (cat, sizes) if with_sizes else cat


def gather_cat(tensors: Sequence[torch.Tensor], dst: int = 0) -> list[torch.Tensor] | None:
    """Concatenate each of ``tensors`` (CPU, along dim 0, rank order) on rank ``dst`` only.

    Returns the list of concatenations on ``dst`` and None on other ranks (the inputs
    themselves when not distributed). All tensors of one call must have the same number of
    rows on a rank; ranks may differ. Goes through the gloo CPU group.
    """
    if not initialized():
        return list(tensors)
    group = cpu_group()
    me = tdist.get_rank()
    n = tensors[0].shape[0] if tensors else 0
    sizes = _sizes(n, torch.device("cpu"), group)
    m = max(sizes)
    out: list[torch.Tensor] | None = [] if me == dst else None
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.shape[0] != n:
            raise ValueError("gather_cat: all tensors must have the same number of rows")
        if m != n:
            t = torch.cat([t, torch.zeros((m - n, *t.shape[1:]), dtype=t.dtype)])
        bufs = [torch.empty_like(t) for _ in sizes] if me == dst else None
        tdist.gather(t, bufs, dst=dst, group=group)
        if out is not None:
            out.append(torch.cat([b[:k] for b, k in zip(bufs, sizes)]))
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object from rank ``src`` to every rank (identity when single).

    Goes through the gloo CPU group; tensors inside ``obj`` should be on the CPU (a CUDA tensor
    would arrive on the sender's device index)."""
    if initialized():
        box = [obj]
        tdist.broadcast_object_list(box, src=src, group=cpu_group())
        return box[0]
    return obj


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on rank 0 only and return its result on every rank.

    An exception on rank 0 is re-raised on rank 0 and raised as :class:`DistributedError`
    (with its message) on the others, so no rank is left waiting. Plain call when single.
    """
    if not initialized():
        return fn()
    result, err, exc = None, None, None
    if tdist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # forwarded to every rank below
            err, exc = f"{type(e).__name__}: {e}", e
    result, err = broadcast_object((result, err))
    if exc is not None:
        raise exc
    if err is not None:
        raise DistributedError(f"rank 0 failed: {err}")
    return result


def barrier() -> None:
    if initialized():
        tdist.barrier(group=cpu_group())


def is_main() -> bool:
    return not initialized() or tdist.get_rank() == 0


def shutdown() -> None:
    """Destroy the process groups (call once at the end of a distributed command)."""
    global _CPU_GROUP
    if initialized():
        tdist.destroy_process_group()
    _CPU_GROUP = None
