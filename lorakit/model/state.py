"""The model-level record of adapters: their configs and which ones are active.

Stored on the model object itself so the functional API (``lk.inject(model, ...)``) needs no
wrapper class; per-layer state lives in the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import AdapterNotFoundError, LoraError
from ..layers.base import LoraLayer
from ..layers.modules_to_save import ModulesToSave
from ..layers.trainable_tokens import TrainableTokens
from .targeting import WRAPPERS, structure_generation

BASE = "__base__"  # the pseudo-adapter name meaning "no adapter" in mixed batches
_ATTR = "_lorakit_registry"
_WRAPPERS_ATTR = "_lorakit_wrappers"


@dataclass
class AdapterRegistry:
    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    allocator: Any = None  # AdaLoRA's rank allocator while one trains (model/adalora.py)
    hooks: list = field(default_factory=list)  # forward-hook handles to remove when lorakit goes


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapter registry; raises a clear error if LoRA was never injected."""
    found = model.__dict__.get(_ATTR)
    if found is None:
        raise LoraError("the model has no LoRA adapters; call lk.inject(model, config) or lk.load_adapter first.")
    return found


def ensure_registry(model: nn.Module) -> AdapterRegistry:
    if _ATTR not in model.__dict__:
        model.__dict__[_ATTR] = AdapterRegistry()
    return model.__dict__[_ATTR]


def drop_registry(model: nn.Module) -> None:
    reg = model.__dict__.pop(_ATTR, None)
    for handle in reg.hooks if reg else []:
        handle.remove()


def has_adapters(model: nn.Module) -> bool:
    return bool(model.__dict__.get(_ATTR)) and bool(model.__dict__[_ATTR].configs)


def check_names(model: nn.Module, names, allow_base: bool = False) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = registry(model).configs
    for name in names:
        if name not in known and not (allow_base and name == BASE):
            extra = f" (or {BASE!r} for the base model)" if allow_base else ""
            raise AdapterNotFoundError(f"unknown adapter {name!r}; the model has {sorted(known)}{extra}.")
    return names


def _walk(model: nn.Module, into_copies: bool = True):
    """named_modules' order and names, without entering a LoRA layer's per-adapter submodules (only
    its base layer) and, unless ``into_copies``, a saved module's trainable copies: with many adapters
    loaded those are most of the model's modules, and servers, mixed batches and adapter loads look
    the layers up on every step."""
    seen, todo = set(), [("", model)]
    while todo:
        path, module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = module._modules.items()
        if isinstance(module, LoraLayer):
            children = [(name, child) for name, child in children if name == "base_layer"]
        elif isinstance(module, TrainableTokens):
            children = [(name, child) for name, child in children if name == "original_module"]
        elif isinstance(module, ModulesToSave) and not into_copies:
            children = [(name, child) for name, child in children if name == "original_module"]
        todo.extend((f"{path}.{name}" if path else name, child) for name, child in reversed(list(children))
                    if child is not None)


def walk_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules as named_modules gives them, less the adapters' own (see _walk)."""
    return list(_walk(model))


def _wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LoRA layer, saved module and trainable-tokens table in _walk's order, kept on the model
    until a wrapper is added or removed anywhere (targeting.replace_module, the one way lorakit
    changes a model's structure): a server enters a mixed batch or disables the adapters on every
    decoding step, and walking SmolLM2's modules each time cost 5-8 ms of a 150 ms step."""
    cached = model.__dict__.get(_WRAPPERS_ATTR)
    generation = structure_generation()
    if cached is None or cached[0] != generation:
        cached = (generation, [(n, m) for n, m in _walk(model) if isinstance(m, WRAPPERS)])
        model.__dict__[_WRAPPERS_ATTR] = cached
    return cached[1]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in _wrappers(model) if isinstance(m, LoraLayer)]


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently folded into the base weights."""
    merged: list[str] = []
    for _, layer in [*lora_layers(model), *token_wrappers(model)]:
        merged += [n for n in layer.merged_adapters if n not in merged]
    return merged


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in _wrappers(model) if isinstance(m, ModulesToSave)]


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokens]]:
    """Tables training a few rows (trainable_token_indices), embeddings before tied output heads."""
    found = [(n, m) for n, m in _wrappers(model) if isinstance(m, TrainableTokens)]
    return sorted(found, key=lambda item: item[1].tied_to is not None)


def check_one_token_adapter(model: nn.Module, names: list[str]) -> None:
    """At most one of ``names`` may train rows of any one table (PEFT's rule: with two, whose row
    a token gets would be ambiguous)."""
    for path, table in token_wrappers(model):
        holding = [n for n in names if n in table.adapter_names]
        if len(holding) > 1:
            raise LoraError(f"adapters {holding} both train token rows of {path!r}; use one of them at a time "
                            "(or a mixed batch, one per row).")


def adapter_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LoRA layer, saved module and trainable-tokens table, outermost first (parameter
    wrappers nest)."""
    return list(_wrappers(model))


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's parameters by name (a saved module's frozen original included, its copies
    not), found without walking the adapters' own modules."""
    found = {}
    for path, module in _walk(model, into_copies=False):
        for name, param in module._parameters.items():
            if param is not None and "lora_" not in name:
                found[f"{path}.{name}" if path else name] = param
    return found


def apply_trainability(model: nn.Module) -> None:
    """Only active adapters train (unless loaded for inference); the base stays frozen."""
    reg = registry(model)
    trainable = {n for n in reg.active if not reg.configs[n].inference_mode}
    base = base_parameters(model)
    for p in base.values():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            for p in layer.adapter_parameters(name):
                p.requires_grad_(name in trainable)
    for _, wrapper in saved_modules(model):
        for name, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(name in trainable)
    for _, wrapper in token_wrappers(model):
        for name in wrapper.adapter_names:
            for p in wrapper.adapter_parameters(name):
                p.requires_grad_(name in trainable)
    bias_modes = {reg.configs[n].bias for n in trainable}
    if "all" in bias_modes:
        for pname, p in base.items():
            if pname.endswith("bias") and ".original_module." not in pname:  # a saved module's frozen original
                p.requires_grad_(True)
    elif "lora_only" in bias_modes:
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None and set(layer.adapter_names) & trainable:
                bias.requires_grad_(True)
