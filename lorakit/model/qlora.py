"""QLoRA at the model level: swap a model's linear layers for 4-bit NF4 ones and back. The 4-bit
layer and the NF4 code live in kernels/nf4.py; a quantized base on disk in io/quantized.py."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.nf4 import Linear4bit
from .state import has_adapters
from .targeting import name_matches, output_head_names, replace_module

FULL_WEIGHTS = "_lorakit_full_weights"  # where a 4-bit model's full-precision weights can be read again


def remember_full_weights(model: nn.Module, read) -> None:
    """Record ``read(module_path) -> weight``: the full-precision weight of a 4-bit layer, read from
    the checkpoint the model was loaded from (LoftQ needs it; nothing is kept in memory)."""
    model.__dict__[FULL_WEIGHTS] = read


def full_weights(model: nn.Module):
    """The reader remember_full_weights recorded, or None."""
    return model.__dict__.get(FULL_WEIGHTS)


def quantized_layers(model: nn.Module, skip: list[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of each layer QLoRA stores in 4 bits: every plain nn.Linear but the output
    head (as in QLoRA) and ``skip``. The one statement of the rule: quantizing, loading straight
    into 4 bits, the memory estimate and the streaming merge all ask here."""
    keep = set(output_head_names(model)) | set(skip or [])
    return [(path, m) for path, m in model.named_modules()
            if type(m) is nn.Linear and not any(name_matches(path, k) for k in keep)]


def quantize(model: nn.Module, compute_dtype: torch.dtype = torch.float32, skip: list[str] | None = None) -> nn.Module:
    """Replace the model's frozen nn.Linear layers by NF4 ``Linear4bit`` layers, in place.

    Embeddings, norms and the output head stay as they are (as in QLoRA); ``skip`` names more
    modules (or suffixes) to leave alone. Call before ``lk.inject``.
    """
    if has_adapters(model):
        raise ConfigError("quantize the base before injecting LoRA: lk.quantize(model) then lk.inject(model, config)")
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"compute_dtype must be torch.float32, bfloat16 or float16, got {compute_dtype}")
    targets = quantized_layers(model, skip)
    if not targets:
        raise ConfigError("quantize found no nn.Linear layer to quantize (besides the output head)")
    for path, linear in targets:
        replace_module(model, path, Linear4bit.from_linear(linear, compute_dtype))
    return model


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every ``Linear4bit`` (also inside LoRA wrappers) by a plain nn.Linear holding the
    dequantized weight in ``dtype``: the 16/32-bit export to merge adapters into."""
    for path, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=dtype, device=module.packed.device)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            replace_module(model, path, linear)
    return model
