"""What a run prepares before its first step: the output directory, the usable sequence length and
the model to train (adapters injected from ``TrainOptions.lora_config``, or every weight for --full)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import lorakit as lk

from ..errors import ConfigError
from ..kernels.cpu import native_bf16
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


def usable_seq_len(seq_len: int, config) -> int:
    """--seq-len, capped at the model's limit of positions (its config's max_position_embeddings)."""
    limit = getattr(config, "max_position_embeddings", None)
    return min(seq_len, limit) if limit else seq_len


def clamp_seq_len(seq_len: int, model) -> int:
    usable = usable_seq_len(seq_len, model.config)
    if usable < seq_len:
        warnings.warn(f"--seq-len {seq_len} exceeds the model's limit of {usable} positions; using {usable}",
                      stacklevel=2)
    return usable


def add_and_choose_tokens(model, tokenizer, options: TrainOptions):
    """trainable_token_indices for --add-tokens / --trainable-tokens (None without them).

    --add-tokens adds the tokens to the tokenizer and resizes the embedding (transformers' mean
    initialisation for the new rows); their rows train. An output head with its own weight (untied)
    trains the same rows, or the new tokens could never be predicted. --trainable-tokens names
    existing tokens, as ids or as the tokenizer spells them (e.g. a chat template's <|im_end|>)."""
    if not (options.add_tokens or options.trainable_tokens):
        return None
    ids = [_token_id(tokenizer, token, len(tokenizer)) for token in options.trainable_tokens or []]
    if options.add_tokens:
        known = [t for t in options.add_tokens if t in tokenizer.get_vocab()]
        if known:
            raise ConfigError(f"--add-tokens: {known[:5]} are already in the vocabulary; name existing tokens with "
                              "--trainable-tokens instead")
        tokenizer.add_tokens(list(options.add_tokens))
        model.resize_token_embeddings(len(tokenizer))
        ids += [tokenizer.convert_tokens_to_ids(t) for t in options.add_tokens]
    ids = list(dict.fromkeys(ids))
    if options.full:
        return None  # every row trains anyway; the tokens only needed adding
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if options.add_tokens and head is not None and head.weight is not embedding.weight:
        names = {module: name for name, module in model.named_modules()}
        return {names[embedding]: ids, names[head]: ids}
    return ids


def _token_id(tokenizer, token: str, vocab: int) -> int:
    token = str(token).strip()
    if token.isdigit():
        if int(token) >= vocab:
            raise ConfigError(f"--trainable-tokens: token id {token} is outside the vocabulary of {vocab} tokens")
        return int(token)
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise ConfigError(f"--trainable-tokens: {token!r} is not a token of this tokenizer (give the token as it "
                          "is spelled in the vocabulary, an id, or add it with --add-tokens)")
    return found


def prepare_model(model, options: TrainOptions, total_steps: int | None = None, token_indices=None):
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
        lk.inject(model, options.lora_config(total_steps, token_indices))
    if options.bf16:  # frozen base in bf16 (a QLoRA base: what is not 4-bit); LoRA weights and heads stay fp32
        lk.cast_base(model, torch.bfloat16)
        if next(model.parameters()).device.type == "cpu" and native_bf16() is None:
            warnings.warn("--bf16 on a CPU without a bf16 unit (no AMX-BF16 or AVX512-BF16): the frozen base and "
                          "the loss multiply in fp32, but the rest of a bf16 step is emulated (measured: ~1.6x an "
                          "fp32 step); here --bf16 saves memory, not time (drop it to train in fp32)", stacklevel=2)
    return model


def shards_from_files(options: TrainOptions) -> bool:
    """Whether an FSDP run can build its model on the meta device and have each process read only
    its own shards: a fresh plain-LoRA adapter (inits that read the base weights, DoRA's
    magnitude and a continued adapter need the whole model first)."""
    from ..variants.principal import is_principal_init

    return (not options.full and options.method == "lora" and not options.use_dora and options.adapter is None
            and not is_principal_init(options.init or True) and not (options.add_tokens or options.trainable_tokens))
