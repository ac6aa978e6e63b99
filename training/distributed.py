"""Data-parallel training with torchrun: process group, sharding and metric reduction."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """How many processes torchrun started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Distributed:
    """World size/rank from torchrun's environment; a no-op when run as one process."""

    def __init__(self, device: torch.device):
        self.world_size = launched_world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's slice of a global batch."""
        return items[self.rank :: self.world_size] if self.enabled else items

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks, in one all-reduce: DDP's job for a step it does not run
        (the compiled step calls the model through a traced graph, not through DDP's forward)."""
        if not self.enabled:
            return
        for p in parameters:  # a parameter this rank's batch did not reach may have one on another rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in parameters]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, mean in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(mean)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision (e.g. stop now) for every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())

    def close(self) -> None:
        """Wait for every rank (rank 0 may still be writing files), then tear the group down together."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
