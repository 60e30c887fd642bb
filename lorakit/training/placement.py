"""Where the weights live across processes, and the few things the training loop does differently
because of it. The loop calls the same methods on either placement and never asks which it has.

``Replicated``: one process, or DDP under torchrun: every process holds the whole model and the
gradients are all-reduced. ``Sharded``: FSDP2 (``--fsdp``, fsdp.py): every process holds 1/N of each
weight, so reading or writing the trainable weights is a collective every process must join.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import Distributed


class Replicated:
    def place(self, model: nn.Module, runner: nn.Module, dist: Distributed) -> nn.Module:
        """Move ``model`` to this process's device; returns what runs the training step: ``runner``
        (the model, or the chunked-loss wrapper around it), under DDP when there are several processes."""
        model.to(dist.device)
        if dist.world_size == 1:
            return runner
        from torch.nn.parallel import DistributedDataParallel

        # DDP registers only parameters that require grad: the frozen base is never all-reduced
        return DistributedDataParallel(runner, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    def no_sync(self, wrapped: nn.Module, last: bool, dist: Distributed):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if dist.world_size > 1 and not last:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def step_kwargs(self, chunked: bool) -> dict:
        return {}

    def evaluates(self, dist: Distributed) -> bool:
        """Whether this process runs evaluation forwards: rank 0 alone, as it holds the whole model."""
        return dist.is_main

    def whole_trainable(self, model: nn.Module):
        """A block inside which the trainable parameters are whole tensors (to save them)."""
        return contextlib.nullcontext(model)

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_trainable(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors, by parameter name, into the model's parameters of those names."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in tensors:
                    param.copy_(tensors[name])

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class Sharded(Replicated):
    def __init__(self, checkpoint=None):
        self.checkpoint = checkpoint  # hub/low_memory.EmptyModel: the model is on meta, its values in files

    def place(self, model: nn.Module, runner: nn.Module, dist: Distributed) -> nn.Module:
        """Shard first, then move: each process's device receives its shards, never the whole model.
        A model built on the meta device is sharded empty and each process reads its own shards.
        The sharded model itself runs the step (the chunked loss goes inside its forward)."""
        from .fsdp import shard, shard_from_checkpoint

        if self.checkpoint is not None:
            shard_from_checkpoint(model, self.checkpoint, chunked_loss=runner is not model)
        else:
            shard(model, chunked_loss=runner is not model)
        model.to(dist.device)  # what FSDP does not manage: buffers (rotary tables)
        return model

    def no_sync(self, wrapped: nn.Module, last: bool, dist: Distributed):
        """Skip the gradient reduce-scatter on all but the last micro-batch of an accumulated step."""
        return _gradient_sync(wrapped, last)

    def step_kwargs(self, chunked: bool) -> dict:
        return {"chunked_loss": True} if chunked else {}  # the sharded model runs the chunked loss itself

    def evaluates(self, dist: Distributed) -> bool:
        return True  # every process holds a shard, so every process joins the forwards

    def whole_trainable(self, model: nn.Module):
        from .fsdp import full_trainable

        return full_trainable(model)

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        from .fsdp import optimizer_state

        return optimizer_state(model, optimizer)

    def load_trainable(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from .fsdp import load_full_trainable

        load_full_trainable(model, tensors)

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        from .fsdp import load_optimizer_state

        load_optimizer_state(model, optimizer, state)


def placement_for(fsdp: bool, checkpoint=None) -> Replicated:
    return Sharded(checkpoint) if fsdp else Replicated()


@contextlib.contextmanager
def _gradient_sync(wrapped: nn.Module, sync: bool):
    wrapped.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)
