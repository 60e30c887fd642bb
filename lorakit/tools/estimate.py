"""Know the cost before training: exact LoRA parameter counts and a memory model, from a config alone.

Counts are exact: the model is built on the meta device (shapes, no memory) and LoRA is injected
with the same code that training uses. Memory follows the usual accounting (SPEC.md):

    full fine-tune = weights + gradients + optimizer states + activations
    LoRA           = frozen weights + LoRA (weights + gradients + states) + activations
    QLoRA          = LoRA with the linear layers' weights in NF4 (4.127 bits with double quantization)

Optimizer states are kept in the training dtype (2 × 2 bytes for Adam in 16-bit, as in SPEC's
LLaMA-7B breakdown); LoRA parameters and their states are fp32. Activations per transformer layer
follow Korthikanti et al. (2022): s·b·h·(34 + 5·a·s/h) bytes in 16-bit, the attention-score
term dropped for fused (SDPA / flash) attention; with gradient checkpointing only each layer's
input (2·s·b·h) plus one layer's full activations are kept. The loss head adds 4·b·s·vocab fp32
values (logits, log-softmax and their gradients, alive together when backward starts).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import ConfigError
from ..model.injection import inject
from ..model.qlora import quantized_layers
from ..model.report import trainable_parameters
from ..model.targeting import decoder_blocks

NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)  # codes + 8-bit absmax per 64 + fp32 per 256 blocks = 4.127
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 2, "sgd": 0}
ENCODERS = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "mpnet"}

PRESETS: dict[str, dict] = {
    "bert-base-uncased": dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072),
    "roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                         type_vocab_size=1, pad_token_id=1),
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=2048, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    # GPT-3 175B's shapes (96 layers, d=12288, 96 heads, 2048 context) on an architecture with separate
    # q/k/v projections (GPT-J), so that "Wq, Wv" can be targeted as in the LoRA paper.
    "gpt3-175b": dict(model_type="gptj", vocab_size=50257, n_embd=12288, n_layer=96, n_head=96, n_positions=2048,
                      rotary_dim=128, tie_word_embeddings=False),
    "minilm": dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=12, intermediate_size=1536),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}

# Targets when none are given: the attention q/k/v/o projections of each family.
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


@dataclass(frozen=True)
class MemoryRow:
    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Estimate:
    model: str
    model_params: int  # without LoRA
    lora_params: int
    per_target: dict[str, int]
    per_layer: int  # LoRA parameters in one transformer layer (the first adapted one)
    adapter_bytes_fp32: int
    adapter_bytes_fp16: int
    memory: list[MemoryRow] = field(default_factory=list)

    @property
    def percent(self) -> float:
        """LoRA share of all parameters (model + LoRA), as PEFT's trainable% counts it."""
        return 100.0 * self.lora_params / (self.model_params + self.lora_params)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "model_params": self.model_params, "lora_params": self.lora_params,
            "percent": self.percent, "per_target": self.per_target, "per_layer": self.per_layer,
            "adapter_bytes_fp32": self.adapter_bytes_fp32, "adapter_bytes_fp16": self.adapter_bytes_fp16,
            "memory": [{"method": m.method, "weights": m.weights, "gradients": m.gradients,
                        "optimizer": m.optimizer, "activations": m.activations, "total": m.total}
                       for m in self.memory],
        }


def load_config(preset: str | None = None, config_path: str | None = None, model_dir: str | None = None):
    from transformers import AutoConfig

    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}.")
        kwargs = dict(PRESETS[preset])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = Path(config_path or model_dir or "")
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass --config PATH/config.json, --model DIR or --preset NAME.")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{path} is not a usable transformers config ({exc}); it needs at least model_type "
                          "and the model's size fields (hidden_size, num_hidden_layers, ...).") from None


def build_on_meta(config) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if config.model_type in ENCODERS else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"cannot build a {config.model_type!r} model from this config ({exc}); "
                          "is a required field missing?") from None


def estimate(config, r: int = 8, targets: list[str] | str | None = None, lora_alpha: float | None = None,
             dtype: str = "bf16", optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 512,
             grad_checkpointing: bool = False, name: str | None = None, attention: str = "eager",
             use_dora: bool = False, chunked_loss: bool = False, nproc: int = 1, fsdp: bool = False,
             adapter: LoraConfig | None = None, task: str = "sft", num_generations: int = 8) -> Estimate:
    """Parameter counts and memory for LoRA on the model described by ``config`` (no weights loaded):
    the adapter ``adapter`` when given (a run's own LoraConfig), else one built from r, targets,
    lora_alpha and use_dora.
    The memory is per process: with ``nproc`` processes under DDP each holds it all (batch_size is
    per process); with ``fsdp`` see shard_rows.

    ``task`` counts what preference and RL training add (see task_rows): dpo / orpo / kto train on
    two sequences per example (batch_size pairs); grpo on num_generations completions per prompt
    (batch_size prompts), and its rollouts keep a KV cache of those sequences."""
    if task not in TASK_SEQUENCES:
        raise ConfigError(f"task must be one of {', '.join(TASK_SEQUENCES)}, got {task!r}.")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}.")
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}.")
    if nproc < 1 or (fsdp and nproc < 2):
        raise ConfigError(f"nproc must be at least 1 (at least 2 with fsdp), got {nproc}.")
    if attention not in ("eager", "sdpa"):
        raise ConfigError(f"attention must be 'eager' (scores kept for backward) or 'sdpa' (fused), got {attention!r}.")
    model = build_on_meta(config)
    model_params = sum(p.numel() for p in model.parameters())
    quantized = [m.weight.numel() for _, m in quantized_layers(model)]  # what QLoRA stores in 4 bits
    linear_params, largest_linear = sum(quantized), max(quantized, default=0)
    if adapter is None:
        targets = targets if targets is not None else DEFAULT_TARGETS.get(config.model_type)
        adapter = LoraConfig(r=r, lora_alpha=lora_alpha or r, target_modules=targets, use_dora=use_dora)
    r = adapter.r
    inject(model, adapter)
    report = trainable_parameters(model)
    per_target: dict[str, int] = {}
    per_layer: dict[int, int] = {}
    for row in report.rows:
        target = row.module.rsplit(".", 1)[-1]
        per_target[target] = per_target.get(target, 0) + row.trainable
        found = re.search(r"\.(\d+)\.", row.module)
        if found:
            layer = int(found.group(1))
            per_layer[layer] = per_layer.get(layer, 0) + row.trainable
    sequences = batch_size * (num_generations if task == "grpo" else TASK_SEQUENCES[task])
    memory = memory_table(config, model_params, linear_params, report.lora, len(report.rows), DTYPE_BYTES[dtype],
                          optimizer, sequences, seq_len, grad_checkpointing, r, attention == "eager", chunked_loss,
                          largest_linear)
    if task == "grpo":  # the rollout engine's KV cache stays allocated beside the training step
        cache = rollout_cache_bytes(config, sequences, seq_len, DTYPE_BYTES[dtype])
        memory = [dataclasses.replace(row, activations=row.activations + cache) for row in memory]
    if fsdp:
        memory = shard_rows(memory, model, model_params, nproc)
    return Estimate(
        model=name or getattr(config, "_name_or_path", "") or config.model_type,
        model_params=model_params, lora_params=report.lora, per_target=per_target,
        per_layer=per_layer[min(per_layer)] if per_layer else report.lora,
        adapter_bytes_fp32=4 * report.lora, adapter_bytes_fp16=2 * report.lora, memory=memory,
    )


# sequences in the training forward per example: a pair's chosen and rejected (an upper bound:
# lorakit lays both after one copy of their prompt); KTO's completion and its KL completion
TASK_SEQUENCES = {"sft": 1, "lm": 1, "classify": 1, "dpo": 2, "orpo": 2, "kto": 2, "grpo": 1}


def rollout_cache_bytes(config, sequences: int, seq_len: int, bytes_per: int) -> int:
    """Keys and values of ``sequences`` rows of ``seq_len`` positions in every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * sequences * seq_len * bytes_per


def activation_bytes(config, batch: int, seq: int, bytes_per: int, checkpointing: bool, scores: bool = True,
                     chunked_loss: bool = False) -> int:
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    per_layer_16bit = seq * batch * h * (34 + (5 * heads * seq / h if scores else 0))
    per_layer = per_layer_16bit * bytes_per / 2
    if checkpointing:
        layers_total = layers * 2 * seq * batch * h * bytes_per / 2 + per_layer
    else:
        layers_total = layers * per_layer
    # At the start of backward the fp32 logits, their log-softmax and both gradients coexist; the
    # chunked loss (lorakit train's, kernels/losses.py) holds them for one chunk of tokens at a time.
    tokens = batch * seq
    if chunked_loss:
        from ..kernels.losses import CHUNK_ELEMENTS

        tokens = min(tokens, max(16, CHUNK_ELEMENTS[torch.float32] // config.vocab_size))
    logits = 4 * tokens * config.vocab_size * 4
    return int(layers_total + logits)


def dequantized_bytes(weights: int, bytes_per: int) -> int:
    """A 4-bit layer's weight while it computes (kernels/nf4.py dequantizes it per forward and per
    backward): the byte-indexed codes as int32 and their fp32 values together, then the fp32 values
    and the weight in the compute dtype; the largest layer's, one at a time."""
    return weights * (4 + max(2, bytes_per))


def memory_table(config, model_params, linear_params, lora_params, adapted_layers, bytes_per, optimizer,
                 batch, seq, checkpointing, r, scores=True, chunked_loss=False, largest_linear=0) -> list[MemoryRow]:
    states = OPTIMIZER_STATES[optimizer]
    state_bytes = 1 if optimizer == "adamw8bit" else bytes_per
    acts = activation_bytes(config, batch, seq, bytes_per, checkpointing, scores, chunked_loss)
    lora_acts = adapted_layers * batch * seq * r * 4  # each adapted layer's fp32 r-wide intermediate
    lora_states = lora_params * 4 * states  # LoRA trains in fp32: fp32 optimizer states
    nf4_weights = int(linear_params * NF4_BITS_PER_WEIGHT / 8) + (model_params - linear_params) * bytes_per
    return [
        MemoryRow("full", model_params * bytes_per, model_params * bytes_per, model_params * states * state_bytes,
                  acts),
        MemoryRow("lora", model_params * bytes_per + lora_params * 4, lora_params * 4, lora_states, acts + lora_acts),
        MemoryRow("qlora", nf4_weights + lora_params * 4, lora_params * 4, lora_states,
                  acts + lora_acts + dequantized_bytes(largest_linear, bytes_per)),
    ]


def shard_rows(rows: list[MemoryRow], model, model_params: int, nproc: int) -> list[MemoryRow]:
    """Per-process memory under FSDP (fully_shard per decoder block, the rest in the root unit):
    weights, gradients and optimizer states split N ways; on top, what is whole while it runs:
    the root unit (embeddings, final norm, head: gathered for the whole step) and two blocks (the
    one computing and the one prefetched). Activations are per process as before."""
    blocks = decoder_blocks(model)
    sizes = [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n) for b in blocks]  # base weights
    block_params, root_params = max(sizes, default=0), model_params - sum(sizes)
    gathered_share = (root_params + 2 * block_params) / model_params  # of the weights, whole at a time
    return [MemoryRow(row.method, int(row.weights / nproc + row.weights * gathered_share * (1 - 1 / nproc)),
                      row.gradients // nproc, row.optimizer // nproc, row.activations) for row in rows]


def single_projection(out_features: int, in_features: int, r: int) -> tuple[int, int, float]:
    """LoRA parameters for one out×in projection: (lora, base, percent of base)."""
    lora = r * (in_features + out_features)
    base = in_features * out_features
    return lora, base, 100.0 * lora / base
