"""Multi-process training under torchrun (torch.distributed): process group from the environment,
rank-0 gating, and the few collectives the engine needs. One process = world of 1, no group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ssmis.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = env_world()
    if world == 1:
        return DistInfo()
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def shutdown() -> None:
    """Leave the process group cleanly at the end of a torchrun job (every rank first reaches this point), so that
    no gloo/NCCL worker thread outlives the interpreter (an abort at exit otherwise)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def check_batch(world: int, labeled_bs: int, unlabeled_bs: int) -> None:
    for key, bs in (("train.labeled_bs", labeled_bs), ("train.unlabeled_bs", unlabeled_bs)):
        if bs % world:
            raise UserError(key, f"global batch {bs} does not divide by the {world} processes",
                            f"Batch sizes are global: use a multiple of {world}, or another --nproc_per_node.")


def barrier(info: DistInfo) -> None:
    if info.active:
        tdist.barrier()


def any_true(info: DistInfo, flag: bool) -> bool:
    """True on every rank if any rank says True (so that all ranks take the same branch)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(info: DistInfo, obj) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj):
    if not info.active:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def average_buffers(info: DistInfo, modules) -> None:
    """Average floating buffers (BN statistics) over ranks, so that evaluation and checkpoints agree."""
    if not info.active:
        return
    with torch.no_grad():
        for m in modules:
            for b in m.buffers():
                if b.dtype.is_floating_point:
                    tdist.all_reduce(b, op=tdist.ReduceOp.SUM)
                    b.div_(info.world)
