"""Many adapters on one model: list, switch, delete, disable."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..errors import LoraError, MergeStateError
from ..layers.base import LoraLayer
from ..layers.per_thread import assign
from .injection import check_new_name, set_active
from .merging import drop_empty_wrappers
from .state import (
    adapter_wrappers,
    check_names,
    drop_registry,
    merged_adapters,
    registry,
)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters the model holds, in the order they were added."""
    return list(registry(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapter(s); several active adapters add their updates."""
    names = check_names(model, names)
    merged = merged_adapters(model)
    if merged and set(merged) != set(names):
        raise MergeStateError(
            f"adapters {merged} are merged into the weights; call lk.unmerge(model) before switching adapters."
        )
    set_active(model, names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its weights; the base model and other adapters stay as they are."""
    check_names(model, name)
    if name in merged_adapters(model):
        raise MergeStateError(f"adapter {name!r} is merged into the weights; call lk.unmerge(model) first.")
    reg = registry(model)
    for _, module in adapter_wrappers(model):
        if name in module.adapter_names:
            module.remove_adapter(name)
    del reg.configs[name]
    drop_empty_wrappers(model)
    if not reg.configs:
        drop_registry(model)
        return
    remaining = [a for a in reg.active if a != name]
    set_active(model, remaining or [next(iter(reg.configs))])


def lora_layers_of(model: nn.Module, name: str, doing: str, instead: str) -> dict[str, LoraLayer]:
    """Adapter ``name``'s layers by path, for an operation (``doing``) that covers LoRA layers only;
    raises, saying to ``instead``, when the adapter also lives in other wrappers (saved modules,
    trainable tokens)."""
    holders = {path: module for path, module in adapter_wrappers(model) if name in module.adapter_names}
    others = sorted({type(module).__name__ for module in holders.values() if not isinstance(module, LoraLayer)})
    if others:
        raise LoraError(f"adapter {name!r} also lives in {', '.join(others)} wrappers, which {doing} does not "
                        f"cover; {instead} instead.")
    return holders


def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """Call adapter ``old`` ``new`` from now on: its weights, config and place among the active
    adapters stay as they are. Covers adapters held by LoRA layers only (a server reusing an
    evicted adapter's tensors for the next one); an adapter with saved modules or trainable tokens
    raises before anything changes."""
    check_names(model, old)
    check_new_name(model, new)
    for layer in lora_layers_of(model, old, "renaming", "save it and load it under the new name").values():
        layer.rename_adapter(old, new)
    reg = registry(model)
    configs = [((new if name == old else name), config) for name, config in reg.configs.items()]
    reg.configs.clear()
    reg.configs.update(configs)  # in place and in order: list_adapters keeps its order
    reg.active = [new if name == old else name for name in reg.active]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block (adapters stay loaded)."""
    registry(model)
    merged = merged_adapters(model)
    if merged:
        raise MergeStateError(
            f"adapters {merged} are merged into the weights, so the base model cannot be recovered by "
            "disabling them; call lk.unmerge(model) first."
        )
    wrappers = [m for _, m in adapter_wrappers(model)]
    for module in wrappers:
        assign(module, "disabled", True)
    try:
        yield model
    finally:
        for module in wrappers:
            assign(module, "disabled", False)
