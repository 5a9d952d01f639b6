"""Several processes under torchrun: process group, device, DDP or FSDP2 wrapping, reductions.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 the run initializes a process
group (nccl on GPUs, gloo on CPUs), each rank takes its slice of every global batch, and the
student is wrapped in DistributedDataParallel (gradients all-reduced and averaged), or sharded
with FSDP2 (`torch.distributed.fsdp.fully_shard`, each decoder layer then the root, as
torchtitan does) when train.parallel = "fsdp". Only rank 0 logs and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False        # the process group was created here (and is destroyed at the end)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init(device_name: str) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Env(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Env(rank=rank, world=world, local_rank=local_rank, device=device, owns_group=owns)


def shutdown(env: Env) -> None:
    """Destroy the process group if this run created it (a caller's group is left alone)."""
    if env.distributed and env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, env: Env):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def wrap(module: nn.Module, layers: nn.ModuleList, env: Env, parallel: str) -> nn.Module:
    """DDP, or FSDP2 over each layer then the root; unchanged in a single process."""
    if not env.distributed:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def grad_sync_context(module: nn.Module, env: Env, parallel: str, sync: bool):
    """No gradient reduction on the micro-batches before the last one of an accumulated step."""
    import contextlib

    if not env.distributed or sync:
        if env.distributed and parallel == "fsdp":
            module.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if parallel == "fsdp":
        module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return module.no_sync()
