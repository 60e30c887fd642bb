"""Modules trained in full beside the adapters (``modules_to_save``, e.g. a classifier head).

PEFT's semantics: the original stays frozen, each adapter trains its own copy, and nothing inside
a saved module gets LoRA (targeting.inside_modules_to_save).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .per_thread import PerThread


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapters (e.g. a classifier head): one copy per adapter.

    ``original_module`` stays frozen; ``modules_to_save[name]`` is the adapter's trainable copy.
    """

    # per thread (layers/per_thread.py): serving workers run forwards of one model at once
    disabled = PerThread(False)
    mixed_names = PerThread(None)  # per-row adapter names during lk.mixed_batch

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def __getattr__(self, name: str):
        # answer attribute reads (``.weight``, ``.out_features``) as the module in use does
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            if "original_module" not in modules or name in ("modules_to_save", "original_module"):
                raise
            copies = modules.get("modules_to_save")
            active = self.__dict__.get("active_adapters") or [None]
            chosen = copies[active[0]] if copies is not None and active[0] in copies else modules["original_module"]
            return getattr(chosen, name)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def module_for(self, name: str | None) -> nn.Module:
        if self.disabled or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x, *args, **kwargs):
        if self.mixed_names is not None and not self.disabled:
            return self._forward_mixed(x, *args, **kwargs)
        active = self.active_adapters[0] if self.active_adapters else None
        module = self.module_for(active)
        return module(_in_dtype_of(module, x), *args, **kwargs)

    def _forward_mixed(self, x, *args, **kwargs):
        # Heads are small and arbitrary modules: run each distinct copy once on its own rows.
        names = self.mixed_names
        repeat = x.shape[0] // len(names)
        row_names = [n for n in names for _ in range(repeat)]
        out = None
        for name in dict.fromkeys(row_names):
            rows = torch.tensor([i for i, n in enumerate(row_names) if n == name], device=x.device)
            module = self.module_for(name)
            part = module(_in_dtype_of(module, x.index_select(0, rows)), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def _in_dtype_of(module: nn.Module, x):
    """A trained fp32 copy on a 16-bit base (lk.cast_base) takes its input in fp32."""
    weight = next(module.parameters(), None)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and weight is not None and weight.dtype != x.dtype:
        return x.to(weight.dtype)
    return x
