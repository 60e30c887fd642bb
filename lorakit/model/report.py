"""How many parameters train: totals and one row per adapted module."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..kernels.nf4 import Linear4bit
from .state import lora_layers, saved_modules, token_wrappers


@dataclass(frozen=True)
class ModuleRow:
    module: str
    kind: str  # "lora" or "saved" (a module trained in full)
    adapter: str
    rank: int | None
    trainable: int
    base: int


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int
    lora: int  # LoRA A/B parameters of every adapter, trainable or not
    rows: list[ModuleRow] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f} || LoRA params: {self.lora:,}")

    def table(self) -> str:
        lines = [f"{'module':<60} {'kind':<6} {'adapter':<10} {'r':>4} {'params':>12} {'base':>12}"]
        for row in self.rows:
            rank = "" if row.rank is None else str(row.rank)
            lines.append(f"{row.module:<60} {row.kind:<6} {row.adapter:<10} {rank:>4} "
                         f"{row.trainable:>12,} {row.base:>12,}")
        return "\n".join([*lines, str(self)])


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable vs all parameters (LoRA included in the total, as PEFT counts them; a 4-bit
    layer counts its weights, which it holds as packed buffers rather than parameters)."""

    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows, lora = [], 0
    for path, layer in lora_layers(model):
        base = math.prod(layer.lora_dims())
        for name in layer.adapter_names:
            count = sum(p.numel() for p in layer.adapter_parameters(name))
            lora += count
            rows.append(ModuleRow(path, "lora", name, layer.rank(name), count, base))
    for path, wrapper in saved_modules(model):
        base = sum(p.numel() for p in wrapper.original_module.parameters())
        for name, copy in wrapper.modules_to_save.items():
            rows.append(ModuleRow(path, "saved", name, None, sum(p.numel() for p in copy.parameters()), base))
    for path, table in token_wrappers(model):
        for name in table.adapter_names:
            count = sum(p.numel() for p in table.adapter_parameters(name))
            if count:  # a tied output head trains the embedding's rows, counted there
                rows.append(ModuleRow(path, "tokens", name, None, count, table.original_module.weight.numel()))
    return ParameterReport(trainable=trainable, total=total, lora=lora, rows=rows)
