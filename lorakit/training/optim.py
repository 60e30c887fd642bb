"""A run's optimizer and learning-rate schedule: --optim, --lr-scheduler, --warmup-ratio, --head-lr, LoRA+.

Optimizers (PyTorch's, transformers' or bitsandbytes' own classes):
  adamw      torch.optim.AdamW
  adamw8bit  bitsandbytes' AdamW8bit: both moments stored in 8 bits (block-wise quantized), on CPU
             and GPU; about a quarter of AdamW's state
  sgd        torch.optim.SGD with momentum 0.9
  adafactor  transformers' Adafactor with a fixed learning rate (factored second moment, no first)
Schedules: transformers' get_scheduler (linear, cosine, constant, constant_with_warmup).
"""

from __future__ import annotations

import torch

import lorakit as lk

from ..errors import ConfigError
from ..model.state import saved_modules

OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "adafactor")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def check_choices(options) -> None:
    """Clear errors for optimizer / schedule options, before anything is loaded."""
    if options.optim not in OPTIMIZERS:
        raise ConfigError(f"unknown --optim {options.optim!r}; choose one of {', '.join(OPTIMIZERS)}")
    if options.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown --lr-scheduler {options.lr_scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if options.warmup_ratio is not None and not 0 <= options.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {options.warmup_ratio}")
    if options.head_lr is not None:
        if options.head_lr <= 0:
            raise ConfigError(f"--head-lr must be > 0, got {options.head_lr}")
        if options.full:
            raise ConfigError("--head-lr sets the learning rate of modules trained in full beside the adapters; with "
                              "--full everything is trained in full: use --lr")
    if options.optim == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--optim adamw8bit needs bitsandbytes: pip install 'lorakit[optim8bit]' "
                              "(or pip install bitsandbytes)") from None


def param_groups(model, options) -> list[dict]:
    """The trainable parameters in groups: LoRA+'s (B faster than A) when asked, and the modules
    trained in full (a classifier head) at --head-lr when given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if options.loraplus_ratio:
        groups = lk.loraplus_param_groups(model, options.lr, options.loraplus_ratio, weight_decay=options.weight_decay)
    else:
        groups = [{"params": trainable, "lr": options.lr, "weight_decay": options.weight_decay}]
    if options.head_lr is not None:
        head = {id(p) for _, wrapper in saved_modules(model) for p in wrapper.parameters() if p.requires_grad}
        if not head:
            raise ConfigError("--head-lr sets the learning rate of modules trained in full (a classifier head, "
                              "--modules-to-save), and this run trains none: drop --head-lr or add --modules-to-save")
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in head]
        groups.append({"params": [p for p in trainable if id(p) in head], "lr": options.head_lr,
                       "weight_decay": options.weight_decay})
    return [g for g in groups if g["params"]]


def build_optimizer(model, options) -> torch.optim.Optimizer:
    groups = param_groups(model, options)
    if options.optim == "adamw":
        return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    if options.optim == "adamw8bit":
        import bitsandbytes as bnb

        # bitsandbytes keeps tensors under min_8bit_size (4,096 by default) in 32 bits; at LoRA's
        # ranks many factors are that small (r=8 x 192 = 1,536), which left the state at 0.32x AdamW's
        return bnb.optim.AdamW8bit(groups, lr=options.lr, weight_decay=options.weight_decay, min_8bit_size=0)
    if options.optim == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=options.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=options.weight_decay)


def build_scheduler(optimizer, options, total_steps: int):
    from transformers import get_scheduler

    if options.warmup_ratio is not None:
        warmup = round(options.warmup_ratio * total_steps)
    else:
        warmup = min(options.warmup_steps, total_steps // 2)
    return get_scheduler(options.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments, quantization maps)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
