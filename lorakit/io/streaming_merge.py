"""Merge an adapter into a base checkpoint shard by shard, within a memory cap.

The base's safetensors shards are read one at a time; in each, every adapted weight gets the
adapter's update added in fp32 and rounded once to the weight's dtype (what `lk.merge` does in
memory, so the result is the same bit for bit), tensors of the adapter's saved modules are
replaced by the adapter's copies, and the shard is written under its own name before the next one
is read. Peak memory is about the largest tensor (twice, while it is merged) plus the adapter,
whatever the model's size (tensors are read straight into their own buffers and written
straight out: no memory map, no whole-shard dict). The output
directory (shards, the index, config and tokenizer files copied from the base) appears whole or
not at all.

Plain LoRA on linear layers, GPT-2's Conv1D and embeddings, and AdaLoRA's SVD form are merged;
DoRA (whose merge needs the full weight's norm, per row: fine per tensor too) as well. An adapter
trained with QLoRA learned its update against the 4-bit base: each weight that ``lk.quantize``
turns into NF4 is quantized and dequantized on its own (the same code, the same values) before
the update is added, and the export is 16/32-bit, never 4-bit again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import delta as arith
from ..errors import ConfigError
from ..variants.adalora import is_adalora
from .atomic import staged_directory
from .checkpoint import read_adapter
from .model_files import INDEX, checkpoint_entries, read_header, read_tensor, shard_files
from .peft_format import ModuleParts, base_name, split_tensors, take_token_rows
from .runs import trained_on_4bit


def _updates(directory: Path):
    """(module path -> its update's parts, the base tensors the adapter replaces (saved modules,
    trained biases) under their base names, weight name -> (token ids, rows) of trainable tokens,
    the adapter's config)."""
    config, tensors = read_adapter(directory)
    parts, others = split_tensors(tensors, directory)
    rows = {f"{path}.weight": found for path, found in take_token_rows(others, config.trainable_token_indices).items()}
    return parts, {base_name(key): tensor for key, tensor in others.items()}, rows, config


def with_token_rows(key: str, table: torch.Tensor, ids: list[int], rows: torch.Tensor) -> torch.Tensor:
    """The table with trainable tokens' rows in place (what lk.merge writes)."""
    if max(ids) >= table.shape[0]:
        raise ConfigError(f"the adapter trains token {max(ids)} but {key} has {table.shape[0]} rows: its run added "
                          "tokens. Merge it without --base (`lorakit merge RUN --output DIR`), which resizes the "
                          "embedding first.")
    return table.index_copy(0, torch.tensor(ids), rows.to(table.dtype))


def check_shape(key: str, weight: torch.Tensor, update: ModuleParts, transposed: bool) -> None:
    """The update B·A must have the weight's shape; name both when it has not (another base)."""
    rows, cols = update.B.shape[0], update.A.flatten(1).shape[1]
    expected = (cols, rows) if transposed else (rows, cols)
    actual = tuple(weight.shape) if transposed or weight.dim() == 2 else (weight.shape[0], weight[0].numel())
    if actual != expected:
        raise ConfigError(f"the adapter's update for {key} has shape {expected} but the base's tensor has shape "
                          f"{tuple(weight.shape)}: the adapter was made for another base model")


def merged_tensor(weight: torch.Tensor, update: ModuleParts, scaling: float, transposed: bool) -> torch.Tensor:
    """The weight with its update folded in by delta.py, the arithmetic lk.merge uses (so the same
    bits), rounded once to the weight's dtype. ``transposed``: the weight is stored in×out (GPT-2's
    Conv1D) or num×dim (an embedding table)."""
    delta = arith.lora_delta(update.A.float(), update.B.float(), scaling,
                             E=None if update.E is None else update.E.float(),
                             shape=tuple(weight.shape), transposed=transposed)
    merged = arith.merged_weight(weight, delta, update.m, axis=arith.feature_axis(transposed))
    return merged.to(weight.dtype)


def quantized_weight_names(base_dir: Path) -> set[str]:
    """The tensors ``lk.quantize`` stores in NF4 for this base: its linear layers' weights but the
    output head's (the model is built on the meta device from its config: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.qlora import quantized_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return {f"{path}.weight" for path, _ in quantized_layers(model)}


def through_4bit(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a QLoRA run saw it: NF4-quantized and dequantized (fp32)."""
    from ..kernels.nf4 import Linear4bit

    layer = Linear4bit(weight.shape[1], weight.shape[0], bias=False)
    layer.set_weight(weight.float())
    return layer.dequantized_weight(torch.float32)


def _merge_shard(source: Path, target: Path, updates: dict, replaced: dict, config, pending: set,
                 quantized: set[str] = frozenset(), token_rows: dict | None = None) -> int:
    """Write ``target`` as ``source`` with the adapter folded in, one tensor in memory at a time.

    Every tensor keeps its name, dtype, shape and place, so the source's header is the target's:
    it is written first, then each tensor as it is computed (the safetensors package writes whole
    dicts only, which would hold a shard at once)."""
    data_start, header = read_header(source)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    with open(source, "rb") as handle, open(target, "wb") as out:
        out.write(handle.read(data_start))  # the length and the header, unchanged
        for key, entry in entries:
            tensor = read_tensor(source, data_start, entry)
            module = key.removesuffix(".weight")
            if module in updates and key.endswith(".weight"):
                check_shape(key, tensor, updates[module], bool(config.fan_in_fan_out) or updates[module].embedding)
            if key in quantized:  # merged or not, the export holds what the 4-bit base computed with
                tensor = through_4bit(tensor).to(tensor.dtype) if module not in updates else \
                    merged_tensor(through_4bit(tensor), updates[module], config.scaling_for(module),
                                  bool(config.fan_in_fan_out)).to(tensor.dtype)
            elif key.endswith(".weight") and module in updates:
                tensor = merged_tensor(tensor, updates[module], config.scaling_for(module),
                                       bool(config.fan_in_fan_out) or updates[module].embedding)
            elif key in replaced:
                tensor = replaced[key].to(tensor.dtype)
            elif key in (token_rows or {}):
                tensor = with_token_rows(key, tensor, *token_rows[key])
            pending.discard(key)
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return entries[-1][1]["data_offsets"][1] if entries else 0


def stream_merge(adapter_dir: str | Path, base_dir: str | Path, output: str | Path, overwrite: bool = False,
                 qlora: bool | None = None) -> dict:
    """``qlora``: the adapter was trained on the NF4-quantized base (None: as its run record says)."""
    base_dir, target = Path(base_dir), Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {target} is not empty; pass --overwrite or choose another --output")
    files, index = shard_files(base_dir)
    checkpoint_entries(base_dir)  # a truncated shard or an index naming absent tensors: refused before writing
    updates, replaced, token_rows, config = _updates(Path(adapter_dir))
    qlora = trained_on_4bit(Path(adapter_dir)) if qlora is None else qlora
    quantized = quantized_weight_names(base_dir) if qlora else frozenset()
    pending = {f"{m}.weight" for m in updates} | set(replaced) | set(token_rows)
    largest = 0
    with staged_directory(target) as staging:
        for name in sorted(p.name for p in base_dir.iterdir() if p.is_file()):
            if not name.endswith(".safetensors") and name != INDEX:
                shutil.copyfile(base_dir / name, staging / name)  # config, tokenizer, generation config
        if index is not None:
            (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for file in files:
            largest = max(largest, _merge_shard(base_dir / file, staging / file, updates, replaced, config, pending,
                                                quantized, token_rows))
        if pending:
            raise ConfigError(f"the adapter adapts {sorted(pending)[0]}, which {base_dir} does not hold "
                              f"({len(pending)} such tensors); it was made for another base model")
    return {"output": str(target), "shards": len(files), "largest_shard_bytes": largest,
            "adapted": len(updates), "replaced": len(replaced) + len(token_rows), "adalora": is_adalora(config), "qlora": qlora}
