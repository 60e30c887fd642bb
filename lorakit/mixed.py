"""Mixed-adapter batches: every row of one batch runs through its own adapter.

Each LoRA layer stacks the adapters' A and B (scaling folded into B, slot 0 = base = zeros) once
on entering the block; a forward then gathers each row's pair and applies them with two batched
matmuls, with no Python loop over adapters or sub-batches.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import LoraError, MergeStateError
from .layers import MixedRows
from .state import BASE, check_names, lora_layers, merged_adapters, saved_modules


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses ``adapter_names[i]`` ("__base__" = no adapter).

    The batch must have len(adapter_names) rows, or a multiple of it when ``generate`` repeats each
    row for beams / num_return_sequences.
    """
    names = check_names(model, adapter_names, allow_base=True)
    if not names:
        raise LoraError("mixed_batch needs one adapter name per batch row; got an empty list.")
    merged = merged_adapters(model)
    if merged:
        raise MergeStateError(f"adapters {merged} are merged into the weights; call lk.unmerge(model) before mixed_batch.")
    distinct = [n for n in dict.fromkeys(names) if n != BASE]
    slot = {BASE: 0, **{n: i for i, n in enumerate(distinct, start=1)}}
    layers = lora_layers(model)
    heads = saved_modules(model)
    for _, layer in layers:
        A_stack, B_stack, dropout = layer.mixed_stacks(distinct)
        rows = torch.tensor([slot[n] for n in names], device=A_stack.device)
        layer.mixed = MixedRows(rows, A_stack, B_stack, dropout, buffers=layer.row_buffers())
    for _, head in heads:
        head.mixed_names = names
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.mixed = None
        for _, head in heads:
            head.mixed_names = None
