"""LoRA+ (Hayou et al. 2024): B learns ``ratio`` times faster than A.

Parameter groups are PEFT's (``create_loraplus_optimizer``), so a recipe moves between the two:
  A            lr                every trainable parameter not listed below (lora_A, saved heads' matrices)
  embedding    embedding_lr      an embedding adapter's lora_embedding_A / lora_embedding_B (default 1e-6)
  B            lr · ratio        lora_B and every 1-D parameter (biases, DoRA magnitudes, norms), with
                                 weight_decay unless it is a bias or sits in a LayerNorm (then 0)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.embedding import LoraEmbedding


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and everything inside a LayerNorm (transformers' rule for weight decay)."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, embedding_lr: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict]:
    """The four LoRA+ groups (A, embedding, B with decay, B without), in PEFT's order."""
    if not ratio > 0:
        raise ConfigError(f"the LoRA+ ratio (lr of B / lr of A) must be > 0, got {ratio}; the paper uses about 16.")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    no_decay = _no_decay_names(model)
    modules = dict(model.named_modules())
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, LoraEmbedding) and ".lora_embedding_" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": embedding_lr},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]


def loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, lr: float = 1e-4,
                       ratio: float = 16.0, embedding_lr: float = 1e-6, weight_decay: float = 0.0,
                       **kwargs) -> torch.optim.Optimizer:
    """An optimizer over the model's trainable parameters with LoRA+ learning rates."""
    groups = loraplus_param_groups(model, lr, ratio, embedding_lr, weight_decay)
    if not any(group["params"] for group in groups):
        raise ConfigError("the model has no trainable parameters; inject an adapter first (lk.inject).")
    return optimizer_cls(groups, lr=lr, **kwargs)
