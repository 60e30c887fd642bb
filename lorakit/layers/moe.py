"""Mixture-of-experts targets: which parameters ``target_parameters`` adapts, and PEFT's mapping of
module names onto the fused expert parameters of transformers v5 MoE models.

transformers v5 fused Mixtral's per-expert w1/w3/w2 (Qwen-MoE's gate_proj/up_proj/down_proj) into
3-D ``gate_up_proj`` / ``down_proj`` parameters and made the router a module with a bare weight.
PEFT keeps old configs (and "all-linear") meaning the same layers by rewriting such names into
``target_parameters``; a fused pair keeps its per-branch scaling by doubling r and alpha.
"""

from __future__ import annotations

import dataclasses

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
    """The MoE family whose conversion applies, looked up as PEFT does (transformers' own table)."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:  # older transformers: no fused experts, nothing to convert
        return None
    family = {**patterns, "mixtral": "mixtral"}.get(model_type)
    return family if family in MOE_TARGET_MAPPING else None


def convert_moe_config(config: LoraConfig, model_type: str | None, linear_leaf_names) -> LoraConfig:
    """Rewrite expert/router module names into target_parameters (PEFT's v4→v5 conversion).

    ``linear_leaf_names()`` gives the leaf names "all-linear" selects, needed only for that case."""
    family = moe_family(model_type)
    spec = config.target_modules
    if family is None or (isinstance(spec, str) and spec != "all-linear"):
        return config  # a regex stays a regex: it matches the v5 modules as written
    mapping = MOE_TARGET_MAPPING[family]
    names = set(linear_leaf_names()) | set(mapping) if spec == "all-linear" else set(spec or [])
    params, remaining, matched = set(config.target_parameters or []), set(), {}
    for name in names:
        old = next((o for o in mapping if name == o or name.endswith(f".{o}")), None)
        if old is None:
            remaining.add(name)
            continue
        params.add(mapping[old])
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
    if params == set(config.target_parameters or []):
        return config
    return dataclasses.replace(config, target_modules=sorted(remaining), target_parameters=sorted(params),
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


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
