"""Fold adapters into the base weights and back; strip lorakit out (combining adapters: combining.py).

merge:   W = W0 + s·B·A  (the merged model costs exactly what the base model costs)
unmerge: W0 = W - s·B·A
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, LoraError, MergeStateError
from ..kernels.nf4 import requantize_warning
from ..layers.base import LoraLayer
from ..layers.trainable_tokens import TrainableTokens
from .qlora import dequantize
from .state import (
    adapter_wrappers,
    check_names,
    check_one_token_adapter,
    drop_registry,
    lora_layers,
    merged_adapters,
    registry,
    token_wrappers,
)
from .targeting import replace_module


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = False,
          requantize: bool = False) -> nn.Module:
    """Add the adapters' updates (default: the active ones) into the base weights.

    safe=True first computes every merged weight on a copy and refuses (model untouched) if any
    holds NaN or Inf. A 4-bit (NF4) base is only merged into with requantize=True, which warns:
    the merged weight is rounded back to 4 bits. ``lk.dequantize(model)`` first keeps the update.
    """
    reg = registry(model)
    names = check_names(model, adapter_names if adapter_names is not None else reg.active)
    already = merged_adapters(model)
    if already:
        raise MergeStateError(f"adapters {already} are already merged; call lk.unmerge(model) before merging again.")
    layers = [(path, layer) for path, layer in lora_layers(model) if set(names) & set(layer.adapter_names)]
    quantized = [path for path, layer in layers if layer.quantized]
    if quantized and not requantize:
        raise MergeStateError(
            f"{quantized[0]!r} has a 4-bit base; merging would round the update back to NF4 and lose most of "
            "it. Call lk.dequantize(model) first to merge into a 16/32-bit copy (what lk.unload and "
            "`lorakit merge` do), or pass requantize=True to accept the loss.")
    if quantized:
        requantize_warning()
    _refuse_tied_weights(model, [(path, layer) for path, layer in layers if not layer.quantized])
    tables = token_wrappers(model)
    check_one_token_adapter(model, names)
    if safe:
        for path, table in tables:
            broken = [n for n in names if n in table.adapter_names and not torch.isfinite(table.deltas[n]).all()]
            if broken:
                raise LoraError(f"adapter {broken[0]!r}'s trainable token rows in {path!r} hold NaN/Inf; nothing was "
                                "merged. The adapter is likely broken (diverged training).")
        for path, layer in layers:
            candidate = layer.base_weight.detach().clone()
            for name in (n for n in names if n in layer.adapter_names):
                candidate += layer.delta_weight(name).detach()
            if not torch.isfinite(candidate).all():
                raise LoraError(
                    f"merging {names} into {path!r} gives NaN/Inf weights; nothing was merged. "
                    "The adapter is likely broken (diverged training); check its weights."
                )
    for _, layer in layers:
        layer.merge([n for n in names if n in layer.adapter_names])
    for _, table in tables:
        table.merge([n for n in names if n in table.adapter_names])
    return model


def _refuse_tied_weights(model: nn.Module, layers) -> None:
    """A weight shared with another module (a tied embedding / output head) cannot take a merge
    without silently changing that other module too."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(pname)
    for path, layer in layers:
        others = [o for o in owners.get(layer.base_weight.data_ptr(), []) if not o.startswith(f"{path}.")]
        if others:
            raise MergeStateError(
                f"{path!r} shares its weight with {others[0]!r} (tied embeddings), so merging would change "
                "both; keep this adapter unmerged, or untie the weights (clone the output head's weight and "
                "set config.tie_word_embeddings=False) before merging."
            )


_merge_into_weights = merge  # unload's `merge` flag shadows the function name


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged update back out of the base weights."""
    registry(model)
    for _, layer in [*lora_layers(model), *token_wrappers(model)]:
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit module, leaving a plain model (in place; also returned).

    merge=True keeps the active adapters' effect by merging them first (a model already merged
    stays merged); modules_to_save keep the active adapter's copy. merge=False restores the base.
    """
    reg = registry(model)
    if merge and any(layer.quantized for _, layer in lora_layers(model)) and not merged_adapters(model):
        dequantize(model)  # merge into a 32-bit copy of the 4-bit base, never back into 4 bits
    if merge and not merged_adapters(model):
        _merge_into_weights(model, reg.active)
    if not merge:
        unmerge(model)
    active = reg.active[0] if merge and reg.active else None
    _replace_wrappers(model, keep_copy=active)
    drop_registry(model)
    return model


def _replace_wrappers(model: nn.Module, keep_copy: str | None, only_empty: bool = False) -> None:
    # repeated until nothing changes: parameter wrappers nest (one per adapted parameter)
    while _replace_wrappers_once(model, keep_copy, only_empty):
        pass


def _replace_wrappers_once(model: nn.Module, keep_copy: str | None, only_empty: bool) -> bool:
    changed = False
    for path, module in adapter_wrappers(model):
        if only_empty and module.adapter_names:
            continue
        if model.get_submodule(path) is not module:
            continue  # moved by replacing its outer wrapper in this pass
        if isinstance(module, LoraLayer):
            plain = module.base_layer
        elif isinstance(module, TrainableTokens):  # merged: its rows are in the table; else never were
            plain = module.original_module
        else:
            plain = module.module_for(keep_copy) if keep_copy else module.original_module
        plain.requires_grad_(False)
        replace_module(model, path, plain)
        changed = True
    return changed


def drop_empty_wrappers(model: nn.Module) -> None:
    """Give layers that no longer hold any adapter back their plain module."""
    _replace_wrappers(model, keep_copy=None, only_empty=True)


def cast_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store the frozen base in ``dtype`` (bf16/fp16) and keep every trainable parameter (LoRA A/B,
    modules_to_save copies, trained biases) in fp32, so updates and optimizer state stay exact."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"cast_base takes torch.bfloat16, torch.float16 or torch.float32, got {dtype}.")
    registry(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
    return model
