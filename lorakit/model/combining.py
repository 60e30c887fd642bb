"""Combine adapters already on a model into a new one, with PEFT's ``add_weighted_adapter`` semantics.

Two families, as PEFT has them:

- on the factors (equal ranks): "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"
  combine the A matrices (weights sign(w·s)·sqrt|w·s|) and the B matrices (sqrt|w·s|) separately,
  each with merge_algebra.combine_tensors; the new rank is the adapters' rank.
- on the updates: "svd" and the "*_svd" forms combine the full updates s·B·A with the same algebra
  and keep the top ``svd_rank`` singular directions; "cat" stacks the factors (rank = Σ r_i, the
  exact weighted sum of the updates).

The new adapter gets lora_alpha = r (scaling 1), is added inactive and frozen.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..errors import ConfigError, LoraError
from ..layers.base import LoraLayer
from ..variants.adalora import is_adalora
from .injection import apply_plan, plan_injection
from .state import check_names, lora_layers, registry, saved_modules
from .task_arithmetic import METHODS, SIGN_METHODS, check_density, combine_tensors

FACTOR_METHODS = METHODS  # linear, ties, dare_linear, dare_ties, magnitude_prune
UPDATE_METHODS = ("svd", *(f"{m}_svd" for m in METHODS if m != "linear"))
COMBINATIONS = (*FACTOR_METHODS, "cat", *UPDATE_METHODS)


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    combination: str | None = None,
) -> None:
    """Create ``adapter_name`` from a weighted combination of ``adapters`` (PEFT's arguments and
    default, "svd"; ``combination`` is an older spelling of ``combination_type``)."""
    combination_type = combination or combination_type
    names = check_names(model, adapters)
    if adapter_name in registry(model).configs:
        raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick a new name or delete it first.")
    if len(names) == 1:
        combination_type = "linear"  # as PEFT: one adapter is only ever scaled
    check_combination(combination_type, len(names), len(weights), density, majority_sign_method)
    base_method = algebra_of(combination_type)
    configs = [registry(model).configs[n] for n in names]
    check_combinable([f"adapter {n!r}" for n in names], configs)
    shared = [c for c in saved_modules(model) if sum(n in c[1].adapter_names for n in names) > 1]
    if shared:
        raise LoraError(f"adapters {names} all train {shared[0][0]!r} in full (modules_to_save); it cannot be combined.")

    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in FACTOR_METHODS and len(set(ranks)) != 1:
        raise ConfigError(f"combination {combination_type!r} combines the A and B factors and needs equal ranks, "
                          f"got {ranks}; use 'cat' or an '*_svd' form.")
    new_rank = ranks[0] if combination_type in FACTOR_METHODS else (
        sum(ranks) if combination_type == "cat" else svd_rank or max(ranks))

    new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=_union_targets(configs),
                                     rank_pattern={}, alpha_pattern={}, inference_mode=True)
    plan = plan_injection(model, new_config, adapter_name)
    apply_plan(model, plan, adapter_name)
    svd = {"rank": new_rank, "clamp": svd_clamp, "full_matrices": svd_full_matrices, "driver": svd_driver}
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter_name not in layer.adapter_names:
                continue
            present = [(n, w) for n, w in zip(names, weights) if n in layer.adapter_names]
            A_new, B_new = layer.lora_pair(adapter_name)
            A_new.zero_()
            B_new.zero_()
            if not present:
                continue
            if combination_type == "cat":
                _cat_into(layer, present, A_new, B_new)
            elif combination_type in FACTOR_METHODS:
                _factors_into(layer, present, A_new, B_new, combination_type, density, majority_sign_method)
            else:
                _svd_into(layer, present, A_new, B_new, base_method, density, majority_sign_method, **svd)


def algebra_of(combination_type: str) -> str:
    """The task-vector algebra a combination applies: "cat" and "svd" sum plainly ("linear"),
    "ties_svd" applies "ties" to the updates, the factor methods are their own."""
    if combination_type in ("cat", "svd"):
        return "linear"
    return combination_type.removesuffix("_svd")


def check_combination(combination_type: str, adapters: int, weights: int, density: float | None,
                      majority_sign_method: str = "total") -> None:
    """The arguments of a combination, checked before anything is built (lk.add_weighted_adapter
    and `lorakit combine` both call this)."""
    if weights != adapters:
        raise ConfigError(f"got {adapters} adapters but {weights} weights; pass one weight per adapter.")
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"unknown combination {combination_type!r}; use one of {', '.join(COMBINATIONS)}.")
    check_density(algebra_of(combination_type), density)
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")


def check_combinable(labels: list[str], configs) -> None:
    """Adapters whose updates can be summed: plain LoRA on modules (``labels`` name them in errors)."""
    for label, config in zip(labels, configs):
        if config.target_parameters:
            raise ConfigError(f"{label} adapts parameters (target_parameters); they cannot be combined.")
        if is_adalora(config):
            raise ConfigError(f"{label} is AdaLoRA: as in PEFT, AdaLoRA adapters are not combined (their "
                              "scaling and pruned triplets do not add); merge it instead (lk.merge, `lorakit merge`).")
        if config.use_dora:
            raise ConfigError(f"{label} uses DoRA: its magnitude vector rescales the whole weight, so weighted "
                              "sums of DoRA adapters have no meaning; merge it instead (lk.merge, `lorakit merge`).")
        if config.trainable_token_indices is not None:
            raise ConfigError(f"{label} trains token embedding rows (trainable_token_indices), which a weighted sum "
                              "cannot mix (rows are values, not updates); merge it instead, or serve it in a mixed "
                              "batch.")


def _union_targets(configs) -> list[str] | str:
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ConfigError("cannot combine adapters whose target_modules mix a regex and a list of names.")
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted({t for c in configs for t in c.target_modules})


def _cat_into(layer: LoraLayer, present, A_new, B_new) -> None:
    A = torch.cat([layer.lora_pair(n)[0] * w * layer.scaling[n] for n, w in present], dim=0)
    B = torch.cat([layer.lora_pair(n)[1] for n, _ in present], dim=1)
    A_new[: A.shape[0]] = A
    B_new[:, : B.shape[1]] = B


def _factors_into(layer: LoraLayer, present, A_new, B_new, method, density, sign_method) -> None:
    # sqrt of |w·s| on both factors, the sign on A only, so B·A carries w·s once
    scaled = [w * layer.scaling[n] for n, w in present]
    weights_A = torch.tensor([math.copysign(math.sqrt(abs(ws)), ws) for ws in scaled], device=A_new.device)
    weights_B = torch.tensor([math.sqrt(abs(ws)) for ws in scaled], device=B_new.device)
    # A's tensors first, then B's: the order of DARE's random draws, as PEFT makes them
    A = combine_tensors(method, [layer.lora_pair(n)[0] for n, _ in present], weights_A, density, sign_method)
    B = combine_tensors(method, [layer.lora_pair(n)[1] for n, _ in present], weights_B, density, sign_method)
    A_new.copy_(A)
    B_new.copy_(B)


def _svd_into(layer: LoraLayer, present, A_new, B_new, method, density, sign_method, *, rank, clamp,
              full_matrices, driver) -> None:
    # the updates in the base weight's layout (where PEFT draws DARE's masks), combined, then
    # brought to B·A's layout: out × (in · kernel)
    deltas = [layer.delta_weight(n) for n, _ in present]
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = combine_tensors(method, deltas, weights, density, sign_method)
    delta = delta.T if layer.transpose_delta else delta.flatten(1)
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())
    U, Vh = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:  # clip outliers at the `clamp` quantile of all factor entries
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    B_new.flatten(1)[:, :k] = U.to(B_new.dtype)
    A_new.view(A_new.shape[0], -1)[:k] = Vh.to(A_new.dtype)
