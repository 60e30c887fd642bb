"""What a run prepares before its first step: the output directory, the usable sequence length and
the model to train (adapters injected from ``TrainOptions.lora_config``, or every weight for --full)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import lorakit as lk

from ..errors import ConfigError
from ..kernels.nf4 import is_quantized
from .distributed import Distributed
from .options import TrainOptions


def prepare_output(output: Path, options: TrainOptions, dist: Distributed) -> None:
    if dist.is_main:
        if output.exists() and any(output.iterdir()) and not (options.resume or options.overwrite):
            raise ConfigError(f"output directory {output} is not empty; pass --overwrite to replace its run, "
                              f"--resume to continue it, or choose another --output")
        output.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def clamp_seq_len(seq_len: int, model) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        warnings.warn(f"--seq-len {seq_len} exceeds the model's limit of {limit} positions; using {limit}",
                      stacklevel=2)
        return limit
    return seq_len


def prepare_model(model, options: TrainOptions, total_steps: int | None = None):
    if options.grad_checkpointing:  # non-reentrant: works with a frozen base and the fused LoRA path
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if options.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if options.qlora and not is_quantized(model):  # Trainer loads it in 4 bits already
        lk.quantize(model, compute_dtype=torch.bfloat16 if options.bf16 else torch.float32)
    if options.adapter:  # continue a trained adapter; a frozen copy of it is the reference policy (TRL's "ref")
        from .objectives.base import REFERENCE

        lk.load_adapter(model, options.adapter, "default", is_trainable=True)
        lk.load_adapter(model, options.adapter, REFERENCE)
        lk.set_adapter(model, "default")
    else:
        # the adapter's initial values depend on the seed alone, not on what loading the model drew
        # (a sharded run builds it on the meta device and draws the same values later: fsdp.py)
        torch.manual_seed(options.seed)
        lk.inject(model, options.lora_config(total_steps))
    if options.bf16:  # frozen base in bf16 (a QLoRA base: what is not 4-bit); LoRA weights and heads stay fp32
        lk.cast_base(model, torch.bfloat16)
    return model


def shards_from_files(options: TrainOptions) -> bool:
    """Whether an FSDP run can build its model on the meta device and have each process read only
    its own shards: a fresh plain-LoRA adapter (inits that read the base weights, DoRA's
    magnitude and a continued adapter need the whole model first)."""
    from ..variants.principal import is_principal_init

    return (not options.full and options.method == "lora" and not options.use_dora and options.adapter is None
            and not is_principal_init(options.init or True))
