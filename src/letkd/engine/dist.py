"""torch.distributed plumbing: launched by ``torchrun``, nothing home-made.

Under ``torchrun --nproc_per_node=N`` the environment holds RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init` starts the process group (NCCL on CUDA, gloo on CPU). A plain ``python`` /
``letkd`` process is world size 1 and needs no process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

__all__ = ["DistInfo", "init", "all_reduce_sum", "barrier", "is_main", "shutdown", "broadcast_object"]


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
    """Start the process group if launched by torchrun; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), dev


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object from rank ``src`` to every rank (no-op when single)."""
    if tdist.is_available() and tdist.is_initialized():
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def is_main() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
