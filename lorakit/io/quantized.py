"""A quantized base on disk: the whole state of a model after ``lk.quantize`` (4-bit codes and
constants included) in one safetensors file, with the 4-bit layers' shapes in its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..kernels.nf4 import Linear4bit
from .atomic import staged_file

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
        device = next(iter(state.values())).device
        model.set_submodule(name, Linear4bit(in_features, out_features, bias, getattr(torch, dtype), device=device))
    model.load_state_dict(state, strict=False)
    return model
