"""Loading a base model within the memory it will use, not the memory of its full-precision copy.

QLoRA: the model is built from its config on the meta device (no weights allocated), its linear
layers replaced by empty 4-bit ones, and then the checkpoint is read one tensor at a time
(io/model_files.py): each linear weight is quantized to NF4 as it arrives and dropped, every
other tensor is kept in the dtype asked for. The peak is the 4-bit model plus one tensor, where
``from_pretrained`` + ``lk.quantize`` first holds the whole model in full precision. The result
equals that path bit for bit (the same NF4 code on the same values; tests/hub/test_low_memory.py).

Before anything is allocated, the model's size in memory is checked against what the machine has
available, so a model that cannot fit is refused with the numbers and the options that would fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..io.model_files import TORCH_DTYPES, Entry, checkpoint_entries, has_safetensors, read_entry
from ..kernels.nf4 import Linear4bit
from ..model.targeting import name_matches, output_head_names

HEAD_PREFIXES = ("classifier", "score", "pre_classifier")  # task heads a base checkpoint lacks: new, initialised
HEADROOM = 0.9  # of the memory available, what a model may take (the rest: activations, the optimizer, the OS)


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(path: str | Path, dtype: torch.dtype, quantized: bool) -> None:
    """Refuse a model whose weights alone exceed the memory available, before loading it; the
    message gives both numbers and what would fit (bf16, 4-bit)."""
    if not has_safetensors(Path(path)):
        return
    available = available_bytes()
    if available is None:
        return
    numel = sum(entry.numel for entry in checkpoint_entries(path).values()
                if TORCH_DTYPES[entry.dtype].is_floating_point)
    sizes = {"fp32": numel * 4, "bf16": numel * 2, "4-bit (--qlora)": numel * 0.52}  # 4.127 bits, most weights
    needed = sizes["4-bit (--qlora)"] if quantized else numel * dtype.itemsize
    if needed <= HEADROOM * available:
        return
    fitting = [f"{name} ({_gb(size)})" for name, size in sizes.items() if size <= HEADROOM * available]
    raise ConfigError(f"{path} holds {numel / 1e9:.2f}B parameters: {_gb(needed)} as "
                      f"{'4-bit' if quantized else str(dtype).removeprefix('torch.')} weights, but this machine has "
                      f"{_gb(available)} available (a model may take {HEADROOM:.0%} of it). "
                      + (f"What would fit: {', '.join(fitting)}." if fitting else
                         "Not even its 4-bit form fits: use a machine with more memory, or shard it with "
                         "torchrun --fsdp over several.")
                      + " `lorakit estimate --model PATH` gives the whole run's memory.")


def _checkpoint_names(entries: dict[str, Entry], model_keys: set[str], prefix: str) -> dict[str, str] | None:
    """Checkpoint tensor name -> the model's name for it: equal, or differing by the base model's
    prefix (a base checkpoint loaded under a task head, as from_pretrained allows). Tensors the
    model has no place for are skipped, as from_pretrained skips them."""
    names = {}
    for key in entries:
        if key in model_keys:
            names[key] = key
        elif f"{prefix}.{key}" in model_keys:
            names[key] = f"{prefix}.{key}"
        elif prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in model_keys:
            names[key] = key[len(prefix) + 1:]
    return names


def _tied_output_weight(model: nn.Module) -> str | None:
    """The output head's weight name when the config ties it to the input embedding."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings() if getattr(text, "tie_word_embeddings", False) else None
    if head is None:
        return None
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter (or buffer) ``name`` by ``tensor``, in the dtype it was built with."""
    path, _, attribute = name.rpartition(".")
    module = model.get_submodule(path)
    if attribute in module._parameters:
        old = module._parameters[attribute]
        module._parameters[attribute] = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
    else:
        module._buffers[attribute] = tensor.to(module._buffers[attribute].dtype)


def load_4bit(path: str | Path, auto_class, config, dtype: torch.dtype, compute_dtype: torch.dtype):
    """(the model of ``auto_class`` for ``config``, the names of the head weights the checkpoint
    lacks and that were initialised): its linear layers (but the output head) in NF4 as
    ``lk.quantize(model, compute_dtype)`` makes them and every other tensor in ``dtype``, read from
    ``path`` one tensor at a time. None when this checkpoint's names need transformers' own
    renaming (then the caller loads it the usual way)."""
    from accelerate import init_empty_weights

    entries = checkpoint_entries(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not loaded
        model = auto_class.from_config(config, dtype=dtype)
    model_keys = set(model.state_dict())
    names = _checkpoint_names(entries, model_keys, getattr(model, "base_model_prefix", ""))
    uncovered = model_keys - set(names.values()) - {_tied_output_weight(model)}
    heads = {key for key in uncovered if key.split(".")[0] in HEAD_PREFIXES}
    if uncovered - heads or not (model_keys & set(names.values())):
        return None
    keep = output_head_names(model)  # the rule of lk.quantize
    targets = {name: module for name, module in model.named_modules()
               if type(module) is nn.Linear and not any(name_matches(name, k) for k in keep)}
    for name, linear in targets.items():
        model.set_submodule(name, Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                             compute_dtype, device="cpu"))
    for key, name in names.items():
        tensor = read_entry(entries[key])
        module, _, attribute = name.rpartition(".")
        if module in targets:  # what from_linear does with the weights from_pretrained would hold
            layer = model.get_submodule(module)
            if attribute == "weight":
                layer.set_weight(tensor.to(dtype))
            else:
                layer.bias.data = tensor.to(dtype).to(compute_dtype)
        else:
            _put(model, name, tensor)
        del tensor
    model.tie_weights()
    for head in sorted({key.rsplit(".", 1)[0] for key in heads}):
        module = model.get_submodule(head)
        module.to_empty(device="cpu")
        model._init_weights(module)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConfigError(f"loading {path} in 4 bits left {left[:3]} without values; load it without --qlora")
    return model.eval(), sorted(heads)
