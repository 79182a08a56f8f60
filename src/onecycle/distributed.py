"""Data-parallel training under torchrun: which process this is, and the few collectives training needs.

`torchrun --nproc_per_node N stages/train_one_cycle.py ...` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE set. Each process trains on its shard of every global batch (train.batch_size stays the global
batch), DistributedDataParallel averages the gradients, and only rank 0 evaluates, writes outputs and
talks to MLflow. Run without torchrun (WORLD_SIZE unset) everything is a single process and nothing here
communicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onecycle.errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()  # one process, no torchrun


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device: 'auto' is CUDA when present (this process's GPU under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but this machine has no CUDA device: use 'auto' or 'cpu'")
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    return torch.device(name)


def start(device_name: str) -> tuple[Group, torch.device]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on GPUs), or stay single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size()), device


def stop(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], group: Group, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (float64: exact counts up to 2**53)."""
    if not group.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def share(obj: object, group: Group) -> object:
    """Rank 0's `obj` on every process."""
    if not group.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()
