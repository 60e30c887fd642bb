"""QLoRA at the model level: swap a model's linear layers for 4-bit NF4 ones and back, and keep a
quantized base on disk. The 4-bit layer and the NF4 code itself live in quantization.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import staged_file
from .errors import AdapterFileError, ConfigError
from .quantization import Linear4bit
from .state import has_adapters
from .targeting import name_matches, output_head_names


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def quantize(model: nn.Module, compute_dtype: torch.dtype = torch.float32, skip: list[str] | None = None) -> nn.Module:
    """Replace the model's frozen nn.Linear layers by NF4 ``Linear4bit`` layers, in place.

    Embeddings, norms and the output head stay as they are (as in QLoRA); ``skip`` names more
    modules (or suffixes) to leave alone. Call before ``lk.inject``.
    """
    if has_adapters(model):
        raise ConfigError("quantize the base before injecting LoRA: lk.quantize(model) then lk.inject(model, config)")
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"compute_dtype must be torch.float32, bfloat16 or float16, got {compute_dtype}")
    keep = set(output_head_names(model)) | set(skip or [])
    targets = [(path, m) for path, m in model.named_modules()
               if type(m) is nn.Linear and not any(name_matches(path, k) for k in keep)]
    if not targets:
        raise ConfigError("quantize found no nn.Linear layer to quantize (besides the output head)")
    for path, linear in targets:
        parent, child = _parent(model, path)
        setattr(parent, child, Linear4bit.from_linear(linear, compute_dtype))
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
            parent, child = _parent(model, path)
            setattr(parent, child, linear)
    return model


QUANT_FILE = "model_nf4.safetensors"


def save_quantized(model: nn.Module, directory):
    """Write a quantized model's whole state (4-bit codes and constants included) to one safetensors
    file, with the 4-bit layers' shapes in its metadata; written to a temporary name and renamed."""
    layers = {path: [m.in_features, m.out_features, m.bias is not None, str(m.compute_dtype).removeprefix("torch.")]
              for path, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ConfigError("the model has no 4-bit layers; call lk.quantize(model) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with staged_file(directory / QUANT_FILE) as tmp:
        save_file(state, tmp, metadata={"lorakit_nf4": json.dumps(layers)})
    return directory / QUANT_FILE


def load_quantized(model: nn.Module, directory) -> nn.Module:
    """Load a file written by ``save_quantized`` into a model of the same architecture (built in
    full precision, e.g. from its config). Every layer and shape is checked before the model is
    touched, so a mismatched checkpoint leaves it as it was."""
    path = Path(directory) / QUANT_FILE
    try:
        with safe_open(str(path), "pt") as handle:
            layers = json.loads((handle.metadata() or {})["lorakit_nf4"])
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise AdapterFileError(f"{path} is not a readable lorakit 4-bit checkpoint ({exc})") from None
    modules = dict(model.named_modules())
    for name, (in_features, out_features, _, _) in layers.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Linear4bit)):
            raise AdapterFileError(f"{path} quantizes {name!r}, which this model does not have as a linear layer; "
                                   "load it into the architecture it was saved from")
        if (module.in_features, module.out_features) != (in_features, out_features):
            raise AdapterFileError(f"{path}: {name!r} is {out_features}x{in_features} in the checkpoint but "
                                   f"{module.out_features}x{module.in_features} in this model")
    quantized_keys = {f"{name}.{buffer}" for name in layers for buffer in ("packed", "absmax_q", "absmax_scale", "absmax_offset")}
    expected = {k for k in model.state_dict() if not any(k.startswith(f"{n}.") for n in layers)} | quantized_keys
    expected |= {f"{n}.bias" for n, spec in layers.items() if spec[2]}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterFileError(f"{path} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
    current = model.state_dict()
    for key in set(state) - quantized_keys:
        if key in current and current[key].shape != state[key].shape:
            raise AdapterFileError(f"{path}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                                   f"{tuple(current[key].shape)} in this model")
    for name, (in_features, out_features, bias, dtype) in layers.items():
        parent, child = _parent(model, name)
        device = next(iter(state.values())).device
        setattr(parent, child, Linear4bit(in_features, out_features, bias, getattr(torch, dtype), device=device))
    model.load_state_dict(state, strict=False)
    return model
