"""Multi-process training through torchrun: process group over gloo (CPU) or nccl (GPU), and the
small collectives the loop needs. How the model is replicated or sharded: placement.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> "Distributed":
        """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; without them, a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if world > 1 and not torch_dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=world, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def reduce_step(self, loss: float, tokens: int, stop: bool) -> tuple[float, int, bool]:
        """Mean loss and total tokens over processes, and whether any process asked to stop."""
        if self.world_size == 1:
            return loss, tokens, stop
        values = torch.tensor([loss, float(tokens), float(stop)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(values)
        return float(values[0]) / self.world_size, int(values[1]), bool(values[2] > 0)

    def sum(self, value: float) -> float:
        """``value`` summed over processes."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(total)
        return float(total[0])

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch_dist.broadcast(value, src=0)
        return bool(value[0] > 0)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            # every process reaches here before any tears its connections down: one that leaves
            # while another still talks to it can abort in gloo's threads at exit (seen once in CI)
            torch_dist.barrier()
            torch_dist.destroy_process_group()

