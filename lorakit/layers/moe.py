"""Mixture-of-experts targets: which parameters ``target_parameters`` adapts, and PEFT's mapping of
module names onto the fused expert parameters of transformers v5 MoE models.

transformers v5 fused Mixtral's per-expert w1/w3/w2 (Qwen-MoE's gate_proj/up_proj/down_proj) into
3-D ``gate_up_proj`` / ``down_proj`` parameters and made the router a module with a bare weight.
PEFT keeps old configs (and "all-linear") meaning the same layers by rewriting such names into
``target_parameters``; a fused pair keeps its per-branch scaling by doubling r and alpha.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, TargetNotFoundError
from .param import innermost

# PEFT's table: the v4 module names of each base MoE family and the v5 parameter they became.
MOE_TARGET_MAPPING = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
MOE_FUSED = {"mixtral": {"gate_up_proj": ["w1", "w3"]}, "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]}}


def moe_family(model_type: str | None) -> str | None:
    """The MoE family whose conversion applies, decided as PEFT does: transformers must convert the
    model's checkpoints (v5 fused them), and the family must be one PEFT maps (transformers' table
    plus Mixtral and Qwen2-MoE, which PEFT adds because newer transformers dropped them from it)."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers: no fused experts, nothing to convert
        return None
    if get_checkpoint_conversion_mapping(model_type) is None:
        return None
    family = {**patterns, "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}.get(model_type)
    return family if family in MOE_TARGET_MAPPING else None


def convert_moe_config(config: LoraConfig, model_type: str | None, modules, linear_leaf_names) -> LoraConfig:
    """Rewrite expert/router module names into target_parameters (PEFT's v4→v5 conversion).

    ``modules`` are the model's (path, module) pairs as the plain model has them; ``linear_leaf_names()``
    gives the leaf names "all-linear" selects. As PEFT >= 0.22: a string (regex or "all-linear") is
    first resolved to leaf names; a name whose modules are all linear layers (a shared expert's
    ``down_proj``) stays a module target and also adapts the fused parameter of that name if the
    model has one outside linear layers; a fused pair keeps its per-branch scaling by doubling r and alpha."""
    family = moe_family(model_type)
    if family is None:
        return config
    mapping = MOE_TARGET_MAPPING[family]
    modules = [(path, innermost(module)) for path, module in modules]
    names = _resolve_string(config, modules, mapping, linear_leaf_names)
    if not names:
        return config  # nothing matched: left for the usual "matched no module" error
    non_linear_params = [f"{path}.{n}" for path, module in modules if not isinstance(module, nn.Linear)
                         for n, _ in module.named_parameters(recurse=False)]
    params, remaining, matched = set(config.target_parameters or []), set(), {}
    for name in names:
        old = next((o for o in mapping if name == o or name.endswith(f".{o}")), None)
        if old is None:
            remaining.add(name)
            continue
        new_name = name.replace(old, mapping[old])
        owners = [module for path, module in modules if path == name or path.endswith(f".{name}")]
        if owners and all(isinstance(module, nn.Linear) for module in owners):
            remaining.add(name)  # real linear layers of that name (a shared expert) keep their LoRA
            if not any(p == new_name or p.endswith(f".{new_name}") for p in non_linear_params):
                continue
        params.add(new_name)
        matched.setdefault(mapping[old], set()).add(old)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for fused, parts in MOE_FUSED[family].items():
        present = matched.get(fused, set())
        if 0 < len(present) < len(parts):
            raise ConfigError(f"target_modules names {sorted(present)} but not {sorted(set(parts) - present)}; in "
                              f"this model they are one fused parameter ({fused}): target all of them or none.")
        if len(present) == len(parts) > 1:
            rank_pattern[rf".*\.{fused}"] = config.r * len(parts)
            alpha_pattern[rf".*\.{fused}"] = config.lora_alpha * len(parts)
    return dataclasses.replace(config, target_modules=sorted(remaining), target_parameters=sorted(params),
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _resolve_string(config: LoraConfig, modules, mapping, linear_leaf_names) -> set[str]:
    """target_modules as a set of names. "all-linear" is the linear layers' leaf names plus every v4 name
    of the family (its experts and router were linear in v4). A regex becomes the leaf names of the
    module and parameter paths it matches, plus the v4 names it would match inside a fused parameter's
    owner (``...experts.gate_proj`` for ``...experts.gate_up_proj``); PEFT does the same, and so a regex
    on such a model widens to every layer with those leaf names."""
    spec = config.target_modules
    if not isinstance(spec, str):
        return set(spec or [])
    if spec == "all-linear":
        return set(linear_leaf_names()) | set(mapping)
    keys = [path for path, _ in modules] + [f"{path}.{n}" for path, module in modules
                                             for n, _ in module.named_parameters(recurse=False)]
    matched = {key.rsplit(".", 1)[-1] for key in keys if _matches(config, key)}
    owners: dict[str, set[str]] = {}
    for path, module in modules:
        for n, _ in module.named_parameters(recurse=False):
            if n != "weight":
                owners.setdefault(n, set()).add(path)
    for old, new in mapping.items():
        if old not in matched and any(_matches(config, f"{owner}.{old}") for owner in owners.get(new, ())):
            matched.add(old)
    return matched


def _matches(config: LoraConfig, key: str) -> bool:
    """PEFT's check of one key against a string target_modules, with its exclusions."""
    excluded = config.exclude_modules
    if excluded and (re.fullmatch(excluded, key) if isinstance(excluded, str)
                     else any(key == e or key.endswith(f".{e}") for e in excluded)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or []):
        return False
    return re.fullmatch(config.target_modules, key) is not None


def find_param_targets(model: nn.Module, config: LoraConfig, modules) -> list[tuple[str, list[str]]]:
    """(module path, parameter names in registration order) for every module owning a targeted
    parameter; a key ``<module>.<param>`` matches an entry equal to it or ending with "." + entry."""
    wanted = list(config.target_parameters or [])
    if not wanted:
        return []
    found = []
    for path, module in modules:
        owner = innermost(module)  # a module already adapted by another adapter: its real module
        names = [n for n, _ in owner.named_parameters(recurse=False)
                 if any(f"{path}.{n}" == w or f"{path}.{n}".endswith(f".{w}") for w in wanted)]
        if names:
            found.append((path, names))
    if not found:
        raise TargetNotFoundError(
            f"target_parameters {wanted} matched no parameter of the model. Parameters that can be targeted "
            f"look like {_param_examples(modules)}; an entry matches '<module path>.<parameter>' or its ending.")
    return found


def nested_path(path: str, names: list[str], name: str) -> str:
    """Where the wrapper for ``name`` sits: the first-registered parameter is wrapped innermost."""
    return path + ".base_layer" * (len(names) - 1 - names.index(name))


def _param_examples(modules) -> list[str]:
    examples = [f"{path.rsplit('.', 1)[-1]}.{n}" for path, m in modules
                for n, p in innermost(m).named_parameters(recurse=False) if p.dim() == 3 or n == "weight"]
    return sorted(set(examples), key=lambda e: (e.endswith(".weight"), e))[:6]
