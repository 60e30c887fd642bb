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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..io.model_files import TORCH_DTYPES, Entry, checkpoint_entries, has_safetensors, read_entry
from ..kernels.nf4 import Linear4bit
from ..model.qlora import quantized_layers, remember_full_weights

HEAD_PREFIXES = ("classifier", "score", "pre_classifier")  # task heads a base checkpoint lacks: new, initialised
HEADROOM = 0.9  # of the memory available, what a model may take (the rest: activations, the optimizer, the OS)


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


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
    fitting = [f"{name} ({human_bytes(size)})" for name, size in sizes.items() if size <= HEADROOM * available]
    raise ConfigError(f"{path} holds {numel / 1e9:.2f}B parameters: {human_bytes(needed)} as "
                      f"{'4-bit' if quantized else str(dtype).removeprefix('torch.')} weights, but this machine has "
                      f"{human_bytes(available)} available (a model may take {HEADROOM:.0%} of it). "
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
    """Replace the meta parameter (or buffer) ``name`` by ``tensor``, in the dtype it was built with
    (a 4-bit layer's tensors come in their own: codes, constants, a bias in the compute dtype)."""
    path, _, attribute = name.rpartition(".")
    module = model.get_submodule(path)
    old = module._parameters[attribute] if attribute in module._parameters else module._buffers[attribute]
    value = tensor if isinstance(module, Linear4bit) else tensor.to(old.dtype)
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attribute] = value


@dataclass
class EmptyModel:
    """A model built on the meta device, and where the checkpoint holds each of its tensors."""

    model: nn.Module
    path: Path
    entries: dict[str, Entry]
    names: dict[str, str]      # checkpoint tensor name -> the model's name for it
    quantized: set[str]        # the modules made 4-bit (empty ``Linear4bit`` layers)
    heads: list[str]           # head weights the checkpoint lacks (initialised, not loaded)
    dtype: torch.dtype         # of the tensors left unquantized
    compute_dtype: torch.dtype | None
    tied: bool                 # the output head is the input embedding


def build_empty(path: str | Path, auto_class, config, dtype: torch.dtype,
                compute_dtype: torch.dtype | None = None) -> EmptyModel | None:
    """The model of ``auto_class`` for ``config`` on the meta device, its linear layers (but the
    output head) as empty 4-bit layers when ``compute_dtype`` is given (``lk.quantize``'s rule).
    None when the checkpoint's names need transformers' own renaming."""
    from accelerate import init_empty_weights

    entries = checkpoint_entries(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not loaded
        model = auto_class.from_config(config, dtype=dtype)
    model_keys = set(model.state_dict())
    names = _checkpoint_names(entries, model_keys, getattr(model, "base_model_prefix", ""))
    tied = _tied_output_weight(model)
    uncovered = model_keys - set(names.values()) - {tied}
    heads = {key for key in uncovered if key.split(".")[0] in HEAD_PREFIXES}
    if uncovered - heads or not (model_keys & set(names.values())):
        return None
    if (Path(path) / "generation_config.json").is_file() and model.can_generate():  # as from_pretrained reads it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    quantized = set()
    if compute_dtype is not None:
        for name, module in quantized_layers(model):
            model.set_submodule(name, Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                                 compute_dtype, device="meta"))
            quantized.add(name)
    return EmptyModel(model, Path(path), entries, names, quantized, sorted(heads), dtype, compute_dtype,
                      tied is not None)


def checkpoint_values(empty: EmptyModel, read_plain=None):
    """(the model's tensor name, its value) for every tensor the checkpoint gives, read one at a
    time; a 4-bit layer's weight arrives as its NF4 codes and constants, computed from the whole
    weight in ``empty.dtype`` as ``Linear4bit.from_linear`` computes them from a loaded layer.
    ``read_plain(name, entry)``: how a tensor left unquantized is read (default: whole; a sharded
    load reads only its own rows)."""
    for key, name in empty.names.items():
        module, _, attribute = name.rpartition(".")
        if module not in empty.quantized:
            yield name, (read_plain or (lambda _, entry: read_entry(entry)))(name, empty.entries[key])
            continue
        tensor = read_entry(empty.entries[key])
        if attribute == "weight":
            shape = empty.entries[key].shape
            codes = Linear4bit(shape[1], shape[0], bias=False, compute_dtype=empty.compute_dtype)
            codes.set_weight(tensor.to(empty.dtype))
            del tensor
            for buffer in ("packed", "absmax_q", "absmax_scale", "absmax_offset"):
                yield f"{module}.{buffer}", getattr(codes, buffer)
        else:  # a 4-bit layer's bias, in its compute dtype
            yield name, tensor.to(empty.dtype).to(empty.compute_dtype)


def fill(empty: EmptyModel) -> nn.Module:
    """Give the empty model its values, one checkpoint tensor at a time; initialise new heads."""
    model = empty.model
    for name, value in checkpoint_values(empty):
        _put(model, name, value)
    model.tie_weights()
    for head in sorted({key.rsplit(".", 1)[0] for key in empty.heads}):
        module = model.get_submodule(head)
        module.to_empty(device="cpu")
        model._init_weights(module)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConfigError(f"loading {empty.path} left {left[:3]} without values; load it without --qlora")
    if empty.quantized:  # LoftQ reads a 4-bit layer's weight again, as it was quantized from (in empty.dtype)
        key_of = {name: key for key, name in empty.names.items()}
        remember_full_weights(model, lambda path: read_entry(empty.entries[key_of[f"{path}.weight"]]).to(empty.dtype))
    return model.eval()


def load_4bit(path: str | Path, auto_class, config, dtype: torch.dtype, compute_dtype: torch.dtype):
    """(the model of ``auto_class`` for ``config``, the names of the head weights the checkpoint
    lacks and that were initialised): its linear layers (but the output head) in NF4 as
    ``lk.quantize(model, compute_dtype)`` makes them and every other tensor in ``dtype``, read from
    ``path`` one tensor at a time. None when this checkpoint's names need transformers' own
    renaming (then the caller loads it the usual way)."""
    empty = build_empty(path, auto_class, config, dtype, compute_dtype)
    if empty is None:
        return None
    return fill(empty), empty.heads
