"""Hot-swapping: a saved adapter's weights into an adapter already in the model, as PEFT's
``hotswap_adapter`` does.

The adapter keeps its name, its modules and (where the ranks agree) its tensors, which are
overwritten in place: nothing is created, so a swap costs a file read and a copy where loading
builds every layer's modules. A server that evicts one adapter for the next reuses the evicted
one's tensors this way (serving/pool.py).

As in PEFT: the two configs must agree on ``use_rslora``, ``lora_dropout``, ``alpha_pattern`` and
``use_dora``; the new adapter may target only modules the old one adapts (a module it leaves out
gets zero A and B, so it adds nothing); each module's scaling becomes the new adapter's; a merged
adapter is refused. Where a module's rank differs, its A and B are rebuilt at the new rank (PEFT
pads a smaller rank with zeros for compiled models and swaps the tensors of a larger one: the same
outputs). Unlike PEFT 0.21: the adapter's recorded config becomes the new one, so that saving it
writes what its weights are; each module's scaling honours the new config's rank_pattern and
alpha_pattern, as loading it does (PEFT's swap matches those patterns against the parameter's full
key, so a patterned module keeps the default rank's scaling); and DoRA adapters swap (PEFT's raises
KeyError on the magnitude's key). tests/io/test_hotswap.py shows both. Adapters with saved modules,
trainable tokens, base-layer tensors, AdaLoRA or parameter targets are refused before anything
changes (the adapter swapped out, too, where it has saved modules or token rows): load them with
``lk.load_adapter``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterMismatchError, ConfigError, LoraError, MergeStateError
from ..layers.base import LoraLayer
from ..model.adapters import lora_layers_of
from ..model.injection import plan_injection
from ..model.state import check_names, merged_adapters, registry
from ..variants.adalora import is_adalora
from .checkpoint import match_tensors, read_adapter, tensor_target

MUST_AGREE = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")  # PEFT's CONFIG_KEYS_TO_CHECK for LoRA
SWAPPABLE = ("A", "B", "magnitude")
PLANNING_NAME = "__hotswap__"  # the new adapter is planned under a name no adapter has


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Replace adapter ``adapter_name``'s weights and scalings by those of the adapter saved in
    ``directory``, keeping its name (PEFT's ``hotswap_adapter``). Every check runs first: a refused
    swap leaves the model as it was."""
    prepare_hotswap(model, directory, adapter_name).apply()
    return model


@dataclasses.dataclass
class Hotswap:
    """A checked swap, not applied yet: the file read, the new adapter planned and matched against
    the model, nothing changed. A server prepares it while forwards run and applies it (a copy)
    alone; the adapter must not change in between."""

    model: nn.Module
    adapter_name: str
    config: LoraConfig
    targets: set[str]
    held: dict[str, LoraLayer]  # the adapter's layers by path
    assignments: list  # ((path, attr), tensor) as io/checkpoint.match_tensors pairs them

    def changes_structure(self) -> bool:
        """Whether applying builds modules (a module's rank changes). Without that, ``apply`` only
        writes the adapter's values and scalings, then drops the mixed-batch caches built from
        them: forwards of other adapters may run meanwhile (a server swaps beside them)."""
        return any(self._rank_changes(path, layer) for path, layer in self.held.items())

    def _rank_changes(self, path: str, layer: LoraLayer) -> bool:
        """The new adapter adapts ``path`` at another rank than the held one: its A and B are built anew."""
        return path in self.targets and layer.rank(self.adapter_name) != self.config.rank_for(path)

    def apply(self) -> None:
        name, config = self.adapter_name, self.config
        with torch.no_grad():
            for path, layer in self.held.items():
                if path not in self.targets:  # as PEFT: what the new adapter leaves out adds nothing
                    for tensor in layer.lora_pair(name):
                        tensor.zero_()
                    continue
                if self._rank_changes(path, layer):
                    A = layer.lora_pair(name)[0]
                    layer.create_pair(name, config.rank_for(path), A.dtype, A.device)
                    for tensor in layer.lora_pair(name):
                        tensor.requires_grad_(A.requires_grad)
                layer.scaling[name] = config.scaling_for(path)
            for (path, attr), tensor in self.assignments:
                target = tensor_target(self.model, path, attr, name)
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        for layer in self.held.values():
            layer.variants[name].forget_values(layer, name)
            layer.clear_mixed_cache()
        registry(self.model).configs[name] = config


def prepare_hotswap(model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> Hotswap:
    """Every check and read of ``hotswap_adapter``, changing nothing; raises as it does."""
    check_names(model, adapter_name)
    if adapter_name in merged_adapters(model):
        raise MergeStateError(f"adapter {adapter_name!r} is merged into the weights; call lk.unmerge(model) "
                              "before hot-swapping it.")
    directory = Path(directory)
    config, tensors = read_adapter(directory)
    old = registry(model).configs[adapter_name]
    for key in MUST_AGREE:
        if getattr(old, key) != getattr(config, key):
            raise ConfigError(f"cannot hot-swap {directory} into {adapter_name!r}: {key} is {getattr(config, key)!r} "
                              f"there and {getattr(old, key)!r} here; load it with lk.load_adapter instead.")
    if is_adalora(config) or config.modules_to_save or config.trainable_token_indices or config.target_parameters:
        raise LoraError(f"{directory} has AdaLoRA, saved modules, trainable tokens or parameter targets, which "
                        "hot-swapping does not cover; load it with lk.load_adapter instead.")
    config = dataclasses.replace(config, inference_mode=old.inference_mode)
    plan = plan_injection(model, config, PLANNING_NAME, strict=False)
    held = lora_layers_of(model, adapter_name, "hot-swapping", "delete it and load the new one with lk.load_adapter")
    outside = [path for path in plan.targets if path not in held]
    if outside:
        raise AdapterMismatchError(f"{directory} adapts {outside[0]} ({len(outside)} modules in all), which "
                                   f"{adapter_name!r} does not; hot-swapping cannot add modules: load it with "
                                   "lk.load_adapter instead.")
    assignments = match_tensors(model, plan, tensors, directory)
    foreign = sorted({attr for (_, attr), _ in assignments if attr not in SWAPPABLE})
    if foreign:
        raise LoraError(f"{directory} also holds base-layer tensors ({', '.join(foreign)}); hot-swapping replaces "
                        "adapter tensors only: load it with lk.load_adapter instead.")
    return Hotswap(model, adapter_name, config, set(plan.targets), held, assignments)
