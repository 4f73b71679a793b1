"""torchrun support shared by training and extraction: process-group set-up (gloo on CPU, nccl on GPU), sharding."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """This rank's contiguous share of a global batch (sizes must divide evenly)."""
        if global_batch % self.world_size:
            raise ValueError(f"optim.batch_size: expected a multiple of the world size {self.world_size}, got {global_batch}")
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single-process context.

    ``device``: where this process computes (checked by ``diffrep.devices.resolve_device``); ``cuda``
    without an index means each rank's own GPU (LOCAL_RANK). None keeps the automatic choice: the
    rank's GPU when CUDA is available, else the CPU. The process group uses nccl on CUDA, else gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank=rank, world_size=world_size, device=device)


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
