"""`lorakit train --fsdp` under torchrun: PyTorch FSDP2 shards the frozen base and the adapters.

``fully_shard`` goes on every decoder block (transformers names them in ``_no_split_modules``) and
then on the module that runs the training step, so each process holds 1/N of every weight between
forwards and gathers one block at a time. FSDP2 shards per parameter, so a bf16 frozen base and
fp32 LoRA weights (and their fp32 optimizer state) share a block; it needs one dtype only among the
trainable ones, which they have. A QLoRA base is sharded too: its 4-bit codes become frozen
parameters (see _shardable_4bit_codes).

Outside the forward the weights are DTensors (each process a shard). The loop reads and writes the
trainable ones through two collectives here, called by every process: ``full_trainable`` (gather
them, e.g. to save the adapter on rank 0) and ``load_full_trainable`` (scatter full tensors back).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model import targeting


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one; a model that names none cannot be sharded."""
    blocks = targeting.decoder_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no decoder blocks (_no_split_modules); --fsdp cannot shard it")
    return blocks


def shard(model: nn.Module, chunked_loss: bool) -> nn.Module:
    """Shard ``model``'s blocks, then the model itself as the root, whose forward gathers what no
    block owns (embeddings, final norm, head). Evaluation and generation call the model as usual.

    The chunked loss (kernels/losses.py) reads the head's weight outside any forward, where FSDP would hand
    it over sharded; so the training step runs it inside the root's forward instead, through a
    ``chunked_loss=True`` keyword this adds to the model's forward."""
    from torch.distributed.fsdp import fully_shard

    _shardable_4bit_codes(model)
    for block in shardable_blocks(model):
        fully_shard(block)
    if chunked_loss:
        _add_chunked_loss_forward(model)
    fully_shard(model)
    return model


def shard_from_checkpoint(model: nn.Module, empty, chunked_loss: bool) -> nn.Module:
    """FSDP without N copies of the model: ``model`` is built on the meta device (its adapters
    already hold their initial values, model/injection.py:materialize_adapters) and ``empty``
    (hub/low_memory.py) says where the checkpoint keeps each base tensor. The meta model is sharded,
    each process allocates only its shards, then reads the checkpoint one tensor at a time and keeps
    its own slice of each: a 4-bit layer's codes are computed from the whole weight on every
    process (the same arithmetic, so the same codes) and sliced like any tensor. Each process reads
    the files itself rather than rank 0 reading and sending: no process ever holds more than its
    shards plus one tensor, and nothing crosses the process group but the adapters' initial values."""
    from ..hub.low_memory import checkpoint_values
    from ..io.model_files import read_entry, read_rows

    def own_rows(name, entry):  # a tensor left unquantized: only this process's rows are read
        target = _tensor(model, name)
        if isinstance(target, DTensor) and target.placements == (Shard(0),) and len(entry.shape) >= 1:
            rows = -(-entry.shape[0] // target.device_mesh.size())  # torch.chunk's split, as FSDP2's
            start = min(entry.shape[0], target.device_mesh.get_local_rank() * rows)
            stop = min(entry.shape[0], start + rows)
            # read only these rows when they are the local shard's shape (checked first: one read)
            if (stop - start, *entry.shape[1:]) == tuple(target.to_local().shape):
                return read_rows(entry, start, stop)
        return read_entry(entry)

    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if not p.is_meta}
    computed = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}  # rotary tables
    shard(model, chunked_loss)
    model.to_empty(device="cpu")  # allocates this process's shards (and the buffers, refilled next)
    with torch.no_grad():
        for name, value in computed.items():
            _tensor(model, name).copy_(value)
        for name, value in checkpoint_values(empty, own_rows):
            target = _tensor(model, name)
            value = value.to(target.dtype)
            if isinstance(target, DTensor) and value.shape == target.to_local().shape and value.shape != target.shape:
                target.to_local().copy_(value)  # already this process's rows
            elif isinstance(target, DTensor):  # this process's slice; src_data_rank=None: no communication
                target.copy_(distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None))
            else:
                target.copy_(value)
            del value
    load_full_trainable(model, adapters)
    return model


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The base's tensor ``name`` (a name of the model before injection: LoRA wraps the module now)."""
    path, _, attribute = name.rpartition(".")
    module = targeting.unwrap(model.get_submodule(path))
    return module._parameters[attribute] if attribute in module._parameters else module._buffers[attribute]


def _shardable_4bit_codes(model: nn.Module) -> None:
    """FSDP shards parameters, not buffers: a QLoRA base keeps its NF4 codes and block scales in
    buffers, so they become frozen parameters here (uint8 / int8 storage, gathered per block with
    the rest and dequantized inside the layer's forward, as the FSDP-QLoRA work stores them)."""
    from ..kernels.nf4 import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in ("packed", "absmax_q", "absmax_scale"):
                tensor = module._buffers.pop(name)
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def _add_chunked_loss_forward(model: nn.Module) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..kernels.losses import causal_lm_loss

    original = model.forward

    def forward(*args, chunked_loss: bool = False, **kwargs):
        if not chunked_loss:
            return original(*args, **kwargs)
        kwargs.pop("return_dict", None)
        return CausalLMOutputWithPast(loss=causal_lm_loss(model, **kwargs))

    model.forward = forward


def _trainable(model: nn.Module):
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.requires_grad:
                yield module, name, param


@contextlib.contextmanager
def full_trainable(model: nn.Module):
    """Inside the block the trainable parameters are whole, plain tensors on every process (a
    gather: all processes must enter), so saving code written for one process works unchanged.
    The sharded parameters are put back on exit; nothing may train inside."""
    swapped = []
    for module, name, param in list(_trainable(model)):
        if isinstance(param, DTensor):
            module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=True)
            swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def load_full_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (by parameter name, every process holding the same) into the shards."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in tensors:
                continue
            value = tensors[name].to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state, whole and keyed by parameter name, on rank 0 (a gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
