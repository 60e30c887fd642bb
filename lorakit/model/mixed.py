"""Mixed-adapter batches: every row of one batch runs through its own adapter.

Each LoRA layer stacks the adapters' A and B (scaling folded into B, slot 0 = base = zeros) once
on entering the block; a forward then gathers each row's pair and applies them with two batched
matmuls, with no Python loop over adapters or sub-batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import LoraError, MergeStateError
from ..layers.per_thread import assign
from .state import BASE, check_names, lora_layers, saved_modules, token_wrappers

CONCAT_COLUMNS = 128  # adapters × rank up to which one-token steps multiply by all adapters at once


@dataclass
class MixedRows:
    """Per-row adapter choice for one layer during ``lk.mixed_batch``.

    slot_of_row[i] indexes the stacked adapters; slot 0 is the base model (all zeros).
    A_stack: slots×in×r_max (Aᵀ), B_stack: slots×r_max×out (s·Bᵀ, the scaling folded in).
    """

    slot_of_row: torch.Tensor
    A_stack: torch.Tensor
    B_stack: torch.Tensor
    dropout_of_slot: torch.Tensor
    buffers: dict = field(default_factory=dict)  # the layer's, reused across blocks
    scale_stack: torch.Tensor | None = None  # DoRA: slots×out scales m/‖W0 + s·B·A‖ (1 elsewhere)
    slot_names: tuple[str, ...] = ()  # the adapter of slot i + 1
    shared: dict = field(default_factory=dict)  # one block's, the same for every layer: row masks

    def adapter_rows(self, batch: int):
        """(adapter name or None for the base, row indices) for each slot present in the batch: for
        layers that run each adapter's rows together instead of gathering per row."""
        slots = self.rows_for(batch)
        for slot in torch.unique(slots).tolist():
            yield (self.slot_names[slot - 1] if slot > 0 else None), (slots == slot).nonzero().squeeze(1)
    _per_batch: dict = field(default_factory=dict)

    def rows_for(self, batch: int) -> torch.Tensor:
        n = self.slot_of_row.numel()
        if batch == n:
            return self.slot_of_row
        if batch % n == 0:  # generate() repeats each row for beams / num_return_sequences
            return self.slot_of_row.repeat_interleave(batch // n)
        raise LoraError(
            f"mixed_batch got {n} adapter names but the batch has {batch} rows; pass one name per row."
        )

    def row_pairs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's Aᵀ (batch×in×r) and s·Bᵀ (batch×r×out), gathered once per block and batch size
        (the rows do not change inside the block, e.g. across generate's decoding steps)."""
        if batch not in self._per_batch:
            rows = self.rows_for(batch)
            A_rows, B_rows = self._outputs(batch)
            torch.index_select(self.A_stack, 0, rows, out=A_rows)
            torch.index_select(self.B_stack, 0, rows, out=B_rows)
            self._per_batch[batch] = (A_rows, B_rows, self.dropout_of_slot.index_select(0, rows))
        return self._per_batch[batch]

    def concatenated(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every adapter side by side, for one-token-per-row steps: Aᵀ of all slots as one
        in×(slots·r) matrix, s·Bᵀ as (slots·r)×out, and a batch×1×(slots·r) mask keeping each row's
        own columns. Two plain GEMMs then replace gathering a pair per row, which at one token per
        row costs more than multiplying by every adapter (measured in benchmarks/mixed_lora.py).
        All three in ``dtype``, converted once per set of stacks. None when the adapters are too many
        or too wide for that to pay."""
        slots, in_dim, rank = self.A_stack.shape
        if (slots - 1) * rank > CONCAT_COLUMNS:
            return None
        A_cat, B_cat = self._derived("concatenated", dtype, lambda: (
            self.A_stack[1:].permute(1, 0, 2).reshape(in_dim, -1).to(dtype).contiguous(),
            self.B_stack[1:].reshape(-1, self.B_stack.shape[2]).to(dtype)))
        # the mask depends only on the rows, the slot count and the rank: one per block, not per
        # layer (built in each of 120 layers it was a sixth of a small decoding step's LoRA cost)
        mask_key = ("mask", batch, slots, rank, dtype, self.A_stack.device)
        if mask_key not in self.shared:
            own = (self.rows_for(batch).view(-1, 1) - 1) == torch.arange((slots - 1) * rank,
                                                                          device=self.A_stack.device) // rank
            self.shared[mask_key] = own.to(dtype).unsqueeze(1)
        return A_cat, B_cat, self.shared[mask_key]

    def per_slot(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the mixed-LoRA kernel (kernels/mixed_lora.py): each adapter's A (adapters×r×in) and
        s·Bᵀ (adapters×r×out), contiguous in ``dtype`` and converted once per set of stacks, and each
        row's adapter index, -1 for the base's rows (nothing to add)."""
        A, B = self._derived("per_slot", dtype, lambda: (
            self.A_stack[1:].transpose(1, 2).to(dtype).contiguous(), self.B_stack[1:].to(dtype).contiguous()))
        key = ("kernel slots", batch)
        if key not in self.shared:  # one per block, shared by the layers; slot 0 (the base) becomes -1
            self.shared[key] = self.rows_for(batch) - 1
        return A, B, self.shared[key]

    def _derived(self, name: str, dtype: torch.dtype, build) -> tuple[torch.Tensor, ...]:
        """Tensors derived from the stacks, built once per set of stacks and dtype. The stacks
        themselves are kept in the key and compared by identity: a data pointer could be reused by
        a later set of stacks once the old one is freed."""
        cached = self.buffers.get(name)
        if cached is None or cached[0] is not self.A_stack or cached[1] is not self.B_stack or cached[2] != dtype:
            cached = (self.A_stack, self.B_stack, dtype, *build())
            self.buffers[name] = cached
        return cached[3:]

    def _outputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Fresh multi-MB tensors on every block cost page faults, so they are kept and reused;
        # not under autograd, whose graph may still hold the previous block's rows.
        shape_a, shape_b = (batch, *self.A_stack.shape[1:]), (batch, *self.B_stack.shape[1:])
        if torch.is_grad_enabled():
            return self.A_stack.new_empty(shape_a), self.B_stack.new_empty(shape_b)
        key = (shape_a, shape_b, self.A_stack.dtype, self.A_stack.device)
        if key not in self.buffers:
            self.buffers[key] = (self.A_stack.new_empty(shape_a), self.B_stack.new_empty(shape_b))
        return self.buffers[key]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str], stack: list[str] | None = None,
                kernel=None) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses ``adapter_names[i]`` ("__base__" = no adapter).

    The batch must have len(adapter_names) rows, or a multiple of it when ``generate`` repeats each
    row for beams / num_return_sequences. ``stack``: the adapters to stack (a superset of the rows'
    names); a caller entering many blocks over changing rows (a server's decoding steps) passes
    the same list each time so that every block reuses one set of stacks. ``kernel``: a
    kernels.mixed_lora.MixedLora for the LoRA term of one-token steps (a server's decoding steps on CPU).
    """
    names = check_names(model, adapter_names, allow_base=True)
    if not names:
        raise LoraError("mixed_batch needs one adapter name per batch row; got an empty list.")
    layers, tables = lora_layers(model), token_wrappers(model)
    heads = [*saved_modules(model), *tables]
    merged = sorted({n for _, layer in [*layers, *tables] for n in layer.merged_adapters})
    if merged:
        raise MergeStateError(f"adapters {merged} are merged into the weights; call lk.unmerge(model) before mixed_batch.")
    distinct = [n for n in dict.fromkeys(names) if n != BASE]
    if stack is not None:
        stack = check_names(model, stack)
        missing = [n for n in distinct if n not in stack]
        if missing:
            raise LoraError(f"mixed_batch: rows name adapters {missing} that are not in stack={stack}.")
        distinct = stack
    slot = {BASE: 0, **{n: i for i, n in enumerate(distinct, start=1)}}
    row_slots = torch.tensor([slot[n] for n in names])
    on_device: dict[torch.device, torch.Tensor] = {}
    shared: dict = {"kernel": kernel}
    slot_names = tuple(distinct)
    for _, layer in layers:
        stacks = layer.mixed_stacks(distinct)
        if stacks.A.device not in on_device:
            on_device[stacks.A.device] = row_slots.to(stacks.A.device)
        rows = on_device[stacks.A.device]
        assign(layer, "mixed", MixedRows(rows, stacks.A, stacks.B, stacks.dropout, buffers=layer.row_buffers(),
                                         scale_stack=stacks.scale, slot_names=slot_names, shared=shared))
    for _, head in heads:
        head.mixed_names = names
    try:
        yield model
    finally:
        for _, layer in layers:
            assign(layer, "mixed", None)
        for _, head in heads:
            head.mixed_names = None
