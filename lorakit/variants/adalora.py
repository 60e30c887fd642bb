"""AdaLoRA (Zhang et al. 2023): the update in SVD form, P·Λ·Q, with a rank budget spent where it matters.

Each adapted layer holds A (Q, r×in), B (P, out×r) and Λ = lora_E (r×1); the update is
s·B·(A ⊙ Λ) with s = lora_alpha / init_r, fixed (PEFT's ``ranknum`` stays at init_r). Training adds an
orthogonality penalty on A and B, and a rank allocator (model/adalora.py) zeroes the least important
triplets (P_i, λ_i, Q_i) until the average rank is ``target_r``. A saved adapter keeps only the live
triplets and says which ones in ``rank_pattern`` ({"<path>.lora_E": [bool] * init_r}), PEFT's format.

The layer side is small: LoraLayer.factors() folds Λ into A, so every forward path (fused training,
merging, mixed batches) works unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class AdaLoraConfig(LoraConfig):
    """PEFT's AdaLoraConfig fields: ``init_r`` triplets per layer at the start, ``target_r`` on
    average at the end; the budget falls on a cubic schedule between step ``tinit`` and step
    ``total_step − tfinal``, re-allocated every ``deltaT`` steps; importance is the product of two
    EMAs (``beta1``: sensitivity |w·∂L/∂w|, ``beta2``: its uncertainty). ``r`` is ignored."""

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # "<path>.lora_E" -> [bool] * init_r

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ConfigError("AdaLoRA cannot use DoRA (as in PEFT); use one or the other.")
        if self.target_parameters:
            raise ConfigError("AdaLoRA adapts modules, not parameters (target_parameters); use LoraConfig for those.")
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ConfigError(f"init_r must be a positive integer, got {self.init_r!r}; PEFT's default is 12.")
        if not isinstance(self.target_r, int) or not 0 < self.target_r <= self.init_r:
            raise ConfigError(f"target_r must be in 1..init_r ({self.init_r}), got {self.target_r!r}: the budget only "
                              "ever shrinks, from init_r to target_r triplets per layer on average.")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoRA needs total_step (> 0), the number of training steps: its budget schedule "
                              "runs from step tinit to step total_step − tfinal.")
        if self.tinit < 0 or self.tfinal < 0 or self.deltaT < 1:
            raise ConfigError(f"tinit and tfinal must be ≥ 0 and deltaT ≥ 1, got {self.tinit}, {self.tfinal}, {self.deltaT}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"the schedule leaves no budgeting phase: tinit ({self.tinit}) must be below total_step − "
                              f"tfinal ({self.total_step} − {self.tfinal}); lower tinit/tfinal or train longer.")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 < beta < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {beta}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be ≥ 0, got {self.orth_reg_weight}.")

    def _check_rank_pattern(self) -> None:
        for key, keep in self.rank_pattern.items():
            if not (isinstance(keep, (list, tuple)) and all(isinstance(k, bool) for k in keep)):
                raise ConfigError(f"AdaLoRA's rank_pattern[{key!r}] must be a list of booleans (which triplets "
                                  f"live), got {keep!r}.")

    def rank_for(self, module_name: str) -> int:
        keep = self.rank_pattern.get(f"{module_name}.lora_E")
        return self.init_r if keep is None else sum(keep)

    def scaling_for(self, module_name: str) -> float:
        # PEFT divides by ranknum = init_r (+1e-5), which pruning never changes
        return self.lora_alpha / (self.init_r + 1e-5)

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["rank_pattern"] = data["rank_pattern"] or None  # PEFT: None until the allocator has masked
        return data


def config_from_peft_dict(data: dict[str, Any]) -> LoraConfig:
    """A LoraConfig or AdaLoraConfig, as adapter_config.json's peft_type says."""
    if data.get("peft_type") == "ADALORA":
        fields = dict(data)
        fields["rank_pattern"] = fields.get("rank_pattern") or {}
        return AdaLoraConfig.from_peft_dict(fields)
    return LoraConfig.from_peft_dict(data)


def is_adalora(config: LoraConfig) -> bool:
    return isinstance(config, AdaLoraConfig)


def add_singular_values(layer, name: str, init) -> None:
    """Give adapter ``name`` of ``layer`` its Λ (lora_E) and PEFT's AdaLoRA start: Λ = 0, A and B
    drawn from N(0, 0.02²) (init_lora_weights=False: all three standard normal, as PEFT)."""
    A, B = layer.lora_pair(name)
    E = torch.empty(A.shape[0], 1, dtype=A.dtype, device=A.device)
    with torch.no_grad():
        if init is False:
            for tensor in (A, B, E):
                tensor.normal_()
        else:
            E.zero_()
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
    layer.lora_E[name] = nn.Parameter(E, requires_grad=A.requires_grad)


def orthogonal_penalty(layers, name: str) -> torch.Tensor:
    """Mean over A and B of ‖A·Aᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT's regulariser, before its weight)."""
    terms = []
    for layer in layers:
        A, B = layer.lora_pair(name)
        for gram in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def rank_mask(layer, name: str) -> torch.Tensor | None:
    """Which of adapter ``name``'s triplets in ``layer`` the rank allocator keeps (None: not masked yet)."""
    return layer.__dict__.get("rank_masks", {}).get(name)


def set_rank_mask(layer, name: str, keep: torch.Tensor) -> None:
    layer.__dict__.setdefault("rank_masks", {})[name] = keep


def saved_pattern(config: AdaLoraConfig, layers, name: str) -> tuple[AdaLoraConfig, dict]:
    """The config to write (rank_pattern from the allocator's masks) and, per layer path, which rows
    of A / B / Λ to keep."""
    pattern = dict(config.rank_pattern)
    rows = {}
    for path, layer in layers:
        keep = rank_mask(layer, name)
        if keep is not None:
            pattern[f"{path}.lora_E"] = keep.tolist()
            rows[path] = keep
    return dataclasses.replace(config, rank_pattern=pattern), rows
