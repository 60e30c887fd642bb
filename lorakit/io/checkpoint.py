"""Save and load adapters in PEFT's format (adapter_config.json + adapter_model.safetensors).

A model's adapter ``name`` goes to the file's keys and back (the key names: io/peft_format.py):
  <path>.lora_A.<name>.weight           <->  <path>.lora_A.weight
  <path>.lora_embedding_A.<name>        <->  <path>.lora_embedding_A
  <path>.modules_to_save.<name>.<param> <->  <path>.<param>
  bias of a LoRA layer                  <->  <path>.base_layer.bias  (bias="all"/"lora_only")
  <path>.trainable_tokens_delta.<name>  <->  <path>.token_adapter.trainable_tokens_delta
(loading also takes a LoRA layer's bias as <path>.bias, and PEFT's saved embedding table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterMismatchError, ConfigError
from ..layers.base import LoraLayer
from ..layers.embedding import LoraEmbedding
from ..layers.modules_to_save import ModulesToSave
from ..layers.moe import nested_path
from ..layers.param import innermost, param_geometry
from ..model.injection import apply_plan, layer_class_for, plan_injection
from ..model.state import check_names, lora_layers, registry, saved_modules, token_wrappers
from ..model.targeting import iter_base_modules, unwrap
from ..variants.adalora import config_from_peft_dict, is_adalora, saved_pattern
from ..variants.dora import magnitude_shape
from ..variants.principal import initial_pair
from .atomic import staged_directory
from .peft_format import (
    CONFIG_FILE,
    LEGACY_WEIGHTS_FILE,
    PREFIX,
    WEIGHTS_FILE,
    adalora_keys,
    base_weight_key,
    bias_key,
    magnitude_key,
    pair_keys,
    saved_key,
    token_rows_key,
    token_table_key,
)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys."""
    check_names(model, adapter_name)
    config = registry(model).configs[adapter_name]
    state: dict[str, torch.Tensor] = {}
    adalora_rows = saved_pattern(config, lora_layers(model), adapter_name)[1] if is_adalora(config) else {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.adapter_names and is_adalora(config):
            # PEFT's AdaLoRA keys (plain parameters: no ".weight"), live triplets only
            keep = adalora_rows.get(path, slice(None))
            A, B = layer.lora_pair(adapter_name)
            key_a, key_b, key_e = adalora_keys(path)
            state[key_a], state[key_b], state[key_e] = A[keep], B[:, keep], layer.lora_E[adapter_name][keep]
        elif adapter_name in layer.adapter_names:
            for key, tensor in zip(pair_keys(path, isinstance(layer, LoraEmbedding)), layer.lora_pair(adapter_name)):
                state[key] = tensor
            if layer.uses_dora(adapter_name):
                state[magnitude_key(path)] = layer.lora_magnitude_vector[adapter_name]
            bias = getattr(layer.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                state[bias_key(path, wrapped=True)] = bias
    for path, wrapper in saved_modules(model):
        if adapter_name in wrapper.adapter_names:
            for param, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[saved_key(path, param)] = tensor
    for path, table in token_wrappers(model):
        if adapter_name in table.adapter_names and table.tied_to is None:
            state[token_rows_key(path)] = table.trainable_tokens_delta[adapter_name]
    if config.bias == "all":
        for path, module in iter_base_modules(model):
            bias = getattr(unwrap(module), "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(module, ModulesToSave):
                state[bias_key(path, wrapped=isinstance(module, LoraLayer))] = bias
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 convert_to_lora: bool | None = None) -> Path:
    """Write ``adapter_name`` as a PEFT adapter directory; files appear complete or not at all.

    An adapter that PiSSA / OLoRA initialised (in this process) changed the base weights, so by
    default it is written converted (``convert_to_lora``): a rank-2r LoRA equal to its whole effect,
    which loads onto the original, unmodified base in lorakit, PEFT, vLLM and the rest (PEFT's
    ``path_initial_model_for_weight_conversion``). convert_to_lora=False writes it plainly, for the
    residual base (PEFT re-runs the initialisation when it loads such a file, and so does lorakit).
    """
    state = adapter_state_dict(model, adapter_name)
    config = registry(model).configs[adapter_name]
    layers = [(path, layer) for path, layer in lora_layers(model) if adapter_name in layer.adapter_names]
    initialised = any(initial_pair(layer, adapter_name) is not None for _, layer in layers)
    if convert_to_lora if convert_to_lora is not None else initialised:
        config = _convert_to_plain_lora(state, config, layers, adapter_name, initialised)
    if is_adalora(config):
        config = saved_pattern(config, layers, adapter_name)[0]
    data = config.to_peft_dict()
    data["inference_mode"] = True  # as PEFT writes it: a saved adapter loads for inference by default
    if any(getattr(layer, "fan_in_fan_out", False) for _, layer in lora_layers(model)
           if adapter_name in layer.adapter_names):
        data["fan_in_fan_out"] = True  # GPT-2 Conv1D stores weights in×out; PEFT reads this flag
    return write_adapter(directory, data, state)


def _convert_to_plain_lora(state, config: LoraConfig, layers, adapter_name: str, initialised: bool) -> LoraConfig:
    """In ``state``, A' = [A ; A0] and B' = [B | −B0] (zeros where no initial pair), so that
    s·B'·A' = s·(B·A − B0·A0); the config doubles r and alpha to keep s (rsLoRA: alpha·√2)."""
    if not initialised:
        raise ConfigError(f"adapter {adapter_name!r} was not initialised with pissa / olora in this process, so "
                          "there is no initial state to convert from; save it plainly.")
    if config.use_dora:
        raise ConfigError("converting a DoRA adapter initialised with pissa / olora is not supported: the magnitude "
                          "is tied to the residual base. Save it with convert_to_lora=False.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("converting with use_rslora and rank_pattern / alpha_pattern is not supported (as in "
                          "PEFT); save it with convert_to_lora=False.")
    for path, layer in layers:
        A, B = layer.lora_pair(adapter_name)
        experts = getattr(layer, "num_experts", 1)
        if experts > 1:  # expert rows interleave (A: E×r×in, B: out×r×E): pad each expert's block
            key_a, key_b = pair_keys(path, embedding=False)
            A3, B3 = A.detach().view(experts, -1, A.shape[-1]), B.detach().view(B.shape[0], -1, experts)
            state[key_a] = torch.cat([A3, torch.zeros_like(A3)], dim=1).reshape(-1, A.shape[-1]).contiguous()
            state[key_b] = torch.cat([B3, torch.zeros_like(B3)], dim=1).reshape(B.shape[0], -1).contiguous()
            continue
        A0, B0 = initial_pair(layer, adapter_name) or (torch.zeros_like(A), torch.zeros_like(B))
        key_a, key_b = pair_keys(path, isinstance(layer, LoraEmbedding))
        state[key_a] = torch.cat([A.detach(), A0.to(A.dtype)], dim=0).contiguous()
        state[key_b] = torch.cat([B.detach(), -B0.to(B.dtype)], dim=1).contiguous()
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    return dataclasses.replace(config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True,
                               rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                               alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def write_adapter(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                  extra_files: dict[str, str] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (and ``extra_files``, name -> text, such
    as a README); files appear complete or not at all.

    Over an existing directory, the other files it holds (a tokenizer, a run record) are linked into
    the new one and the two directories are swapped in one step: a kill at any point leaves the old
    adapter or the new one, never new weights beside an old config."""
    directory = Path(directory)
    with staged_directory(directory) as staging:  # also removes what an earlier, killed save left behind
        if directory.is_dir():
            _carry_other_files(directory, staging, skip=(WEIGHTS_FILE, CONFIG_FILE, LEGACY_WEIGHTS_FILE))
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / WEIGHTS_FILE).chmod(0o644)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text)
    return directory


def _carry_other_files(source: Path, staging: Path, skip: tuple[str, ...]) -> None:
    """Hard-link (or copy, where links are refused) what ``source`` holds besides the adapter files."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in source.iterdir():
        if entry.name in skip:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), staging / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, staging / entry.name, copy_function=link_or_copy, symlinks=True)
        else:
            link_or_copy(entry, staging / entry.name)


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path} not found; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        config = config_from_peft_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON ({exc}); the file is corrupt.") from None
    except TypeError as exc:
        raise ConfigError(f"{config_path} has an invalid field: {exc}") from None
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(
                f"{weights} is corrupt or truncated ({exc}); save the adapter again or copy it whole."
            ) from None
    elif (directory / LEGACY_WEIGHTS_FILE).is_file():
        try:
            tensors = torch.load(directory / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise AdapterFileError(f"{directory / LEGACY_WEIGHTS_FILE} cannot be read ({exc}).") from None
    else:
        raise AdapterFileError(f"{directory} has no {WEIGHTS_FILE}; the adapter is incomplete.")
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT/lorakit adapter into a plain or already adapted model.

    Into a plain model the adapter becomes active; into an adapted one it is added inactive
    (``lk.set_adapter`` it), as in PEFT. is_trainable=False loads it frozen. Every check runs before
    the model is modified, so a failed load leaves the model as it was.
    """
    config, tensors = read_adapter(directory)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    plan = plan_injection(model, config, adapter_name, strict=False)
    assignments = match_tensors(model, plan, tensors, Path(directory))
    apply_plan(model, plan, adapter_name)
    with torch.no_grad():
        for (owner, attr), tensor in assignments:
            target = tensor_target(model, owner, attr, adapter_name)
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    return model  # apply_plan has set what trains


def match_tensors(model, plan, tensors, directory):
    """Pair every tensor in the file with the parameter it fills; raise on any mismatch."""
    config = plan.config
    prefixed = {k.startswith(PREFIX) for k in tensors}
    if len(prefixed) > 1:
        raise AdapterFileError(f"{directory}: mixed key prefixes; expected every key to start with {PREFIX!r}.")
    remaining = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    assignments = []

    def take(key: str, shape: tuple[int, ...], owner: str, attr: str) -> None:
        if key not in remaining:
            raise AdapterMismatchError(
                f"{directory} has no tensor {PREFIX}{key}, which its config targets in this model; "
                f"the adapter was made for another base model (it says {config.base_model_name_or_path!r})."
            )
        tensor = remaining.pop(key)
        if tuple(tensor.shape) != shape:
            raise AdapterMismatchError(
                f"{PREFIX}{key} has shape {tuple(tensor.shape)} in the adapter but the model needs {shape}; "
                f"the adapter was made for another base model (it says {config.base_model_name_or_path!r})."
            )
        assignments.append(((owner, attr), tensor))

    for path in plan.targets:
        base = unwrap(model.get_submodule(path))
        r = config.rank_for(path)
        key_a, key_b = pair_keys(path, isinstance(base, nn.Embedding), prefix="")
        shape_a, shape_b = layer_class_for(base).pair_shapes(base, r)
        magnitude = magnitude_shape(shape_b[0], len(shape_a))  # A has the weight's number of axes
        if is_adalora(config):  # PEFT's AdaLoRA keys: plain parameters, and Λ
            key_a, key_b, key_e = adalora_keys(path, prefix="")
            take(key_e, (r, 1), path, "E")
        take(key_a, shape_a, path, "A")
        take(key_b, shape_b, path, "B")
        if config.use_dora:  # one magnitude per output feature (per embedding dimension)
            take(magnitude_key(path, prefix=""), magnitude, path, "magnitude")
        # PEFT also saves the full embedding table when it adapts an embedding (it may have been
        # resized for new tokens); like PEFT, load it into the base layer.
        if base_weight_key(path, prefix="") in remaining:
            take(base_weight_key(path, prefix=""), tuple(base.weight.shape), path, "base_weight")
    for path, names in plan.param_targets:
        owner = innermost(model.get_submodule(path))
        for name in names:
            experts, k, d, _ = param_geometry(owner, getattr(owner, name))
            r, wrapper = config.rank_for(f"{path}.{name}"), nested_path(path, names, name)
            key_a, key_b = pair_keys(wrapper, embedding=False, prefix="")
            take(key_a, (r * experts, k), wrapper, "A")
            take(key_b, (d, r * experts), wrapper, "B")
    for path in plan.modules_to_save:
        for param, value in unwrap(model.get_submodule(path)).state_dict().items():
            take(saved_key(path, param, prefix=""), tuple(value.shape), path, f"save:{param}")
    for target in plan.token_targets:
        if target.tied_to is None:
            table = unwrap(model.get_submodule(target.path))
            if token_table_key(target.path, prefix="") in remaining:
                take(token_table_key(target.path, prefix=""), tuple(table.weight.shape), target.path, "base_weight")
            take(token_rows_key(target.path, prefix=""), (len(target.indices), table.weight.shape[1]), target.path,
                 "tokens")
    for key in [k for k in remaining if k.endswith(".bias")]:
        path = key.removesuffix(".bias").removesuffix(".base_layer")
        try:
            bias = getattr(unwrap(model.get_submodule(path)), "bias", None)
        except AttributeError:
            bias = None
        if isinstance(bias, torch.Tensor):
            take(key, tuple(bias.shape), path, "bias")
    if remaining:
        key = next(iter(remaining))
        raise AdapterMismatchError(
            f"{directory} holds {PREFIX}{key}, which matches nothing this model would adapt "
            f"({len(remaining)} such tensors); the adapter was made for another base model."
        )
    return assignments


def tensor_target(model: nn.Module, path: str, attr: str, adapter_name: str) -> torch.Tensor:
    module = model.get_submodule(path)
    if attr in ("A", "B"):
        return module.lora_pair(adapter_name)[attr == "B"]
    if attr == "magnitude":
        return module.lora_magnitude_vector[adapter_name]
    if attr == "E":
        return module.lora_E[adapter_name]
    if attr == "bias":
        return unwrap(module).bias
    if attr == "base_weight":
        return unwrap(module).weight
    if attr == "tokens":
        return module.trainable_tokens_delta[adapter_name]
    return module.modules_to_save[adapter_name].state_dict(keep_vars=True)[attr.removeprefix("save:")]
