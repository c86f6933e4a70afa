"""DistributedDataParallel plumbing for torchrun: one process per device, rank 0 logs and writes.

    torchrun --nproc_per_node 4 train.py ...                      # one machine, 4 GPUs (or 4 CPU processes)
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 4 train.py ...

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op and training runs in one
process on one device, unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    Returns the context and the device this process trains on (cuda:LOCAL_RANK on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local), device


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned); the identity in a single process."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
