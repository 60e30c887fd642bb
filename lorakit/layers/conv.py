"""LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (vision and diffusion models).

PEFT's layout, so files cross both ways: A is a convolution with the base's kernel size, stride and
padding (in → r channels, weight r×in×k…), B a 1×1 convolution (r → out, weight out×r×1…). Their
product is the update s·ΔW with ΔW[o, i, …] = Σ_j B[o, j]·A[j, i, …], shaped like the base weight,
which is what merging adds. Grouped convolutions are refused (PEFT cannot merge them either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..variants.dora import DoraConv
from .base import ModulePairLayer, RowGroupedMixed

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_conv(base: nn.Module, path: str) -> None:
    if isinstance(base, CONV_TYPES) and base.groups != 1:
        raise ConfigError(f"{path!r} is a grouped convolution (groups={base.groups}); lorakit adapts convolutions "
                          "with groups=1 only (PEFT cannot merge grouped ones). Leave it out of target_modules.")


class LoraConv(RowGroupedMixed, ModulePairLayer):
    dora_variant = DoraConv

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.conv_cls = type(base_layer) if type(base_layer) in CONV_TYPES else next(
            c for c in CONV_TYPES if isinstance(base_layer, c))

    def lora_dims(self):
        return self.base_layer.in_channels, self.base_layer.out_channels

    @classmethod
    def pair_shapes(cls, base, r):
        """A: r×in×k… (the base's kernel), B: out×r×1… (a 1×1 convolution)."""
        kernel = tuple(base.kernel_size)
        return (r, base.in_channels, *kernel), (base.out_channels, r, *([1] * len(kernel)))

    def create_pair(self, name, r, dtype, device):
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = self.conv_cls(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                          bias=False, dtype=dtype, device=device)
        self.lora_B[name] = self.conv_cls(r, base.out_channels, ones, ones, bias=False, dtype=dtype, device=device)

    def reset_adapter(self, name: str, init) -> None:
        A, B = self.lora_pair(name)
        with torch.no_grad():
            if init is False:
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / A.shape[0])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def add_lora(self, result, x, name):
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))
        return result + (B(h) * self.scaling[name]).to(result.dtype)

    def add_mixed(self, result, x):
        """Each adapter's rows through that adapter (RowGroupedMixed): a convolution's A cannot be
        gathered per row into one matmul."""
        out = result.clone()
        for name, rows in self.mixed.adapter_rows(x.shape[0]):
            if name is None or name not in self.adapter_names:
                continue
            part = result.index_select(0, rows)
            x_rows = x.index_select(0, rows)
            out[rows] = self.variants[name].add(self, part, x_rows, name)
        return out
