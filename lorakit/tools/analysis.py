"""Understand an adapter after training: spectra, effective rank, subspace similarity, compression.

ΔW = s·B·A has rank ≤ r, so its SVD comes from an r×r core without forming ΔW:
B = Q_B·R_B, Aᵀ = Q_A·R_A  ⇒  ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, and the core's SVD gives ΔW's.
Subspace similarity (LoRA paper, SPEC.md): with U_A the right-singular vectors of A,
phi(i, j) = ||U_A1[:, :i]ᵀ U_A2[:, :j]||_F² / min(i, j).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import AdapterMismatchError, ConfigError
from ..io.checkpoint import read_adapter, write_adapter
from ..io.peft_format import pair_keys, split_tensors
from ..variants.adalora import is_adalora


@dataclass(frozen=True)
class ModuleUpdate:
    path: str  # module path in the base model
    A: torch.Tensor  # r×in (r×num_embeddings for embeddings)
    B: torch.Tensor  # out×r
    scaling: float
    embedding: bool

    @property
    def kind(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ΔW = U·diag(S)·Vᵀ with U: out×r, S: r, V: in×r (singular values descending)."""
        Q_b, R_b = torch.linalg.qr(self.B.double())
        Q_a, R_a = torch.linalg.qr(self.A.double().T)
        U_c, S, Vh_c = torch.linalg.svd(self.scaling * R_b @ R_a.T)
        return Q_b @ U_c, S, Q_a @ Vh_c.T

    def right_singular_vectors_of_A(self) -> torch.Tensor:
        return torch.linalg.svd(self.A.double(), full_matrices=False)[2].T  # in×r


@dataclass(frozen=True)
class ModuleStats:
    path: str
    rank: int
    singular_values: list[float]
    norm: float
    effective_rank_90: int
    effective_rank_99: int


def load_updates(directory: str | os.PathLike) -> tuple[LoraConfig, list[ModuleUpdate], dict[str, torch.Tensor]]:
    """The adapter's per-module (A, B, scaling), plus its other tensors (heads, biases) untouched.
    AdaLoRA's Λ is folded into A (the update is s·B·(A⊙Λ)); a DoRA magnitude is not part of it."""
    config, tensors = read_adapter(directory)
    parts, others = split_tensors(tensors, directory)
    updates = []
    for path, part in parts.items():
        A, B = part.folded_A().float(), part.B.float()
        _check_rank(config, path, A, B, directory)
        updates.append(ModuleUpdate(path, A, B, config.scaling_for(path), part.embedding))
    return config, updates, others


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of the squared Frobenius norm."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype) - 1e-12)) + 1


def module_stats(update: ModuleUpdate) -> ModuleStats:
    _, S, _ = update.factors()
    return ModuleStats(update.path, update.rank, [float(s) for s in S], float(S.norm()),
                       energy_rank(S, 0.90), energy_rank(S, 0.99))


def analyze(directory: str | os.PathLike) -> dict:
    config, updates, _ = load_updates(directory)
    stats = [module_stats(u) for u in updates]
    by_kind: dict[str, list[ModuleStats]] = {}
    for update, stat in zip(updates, stats):
        by_kind.setdefault(update.kind, []).append(stat)
    summary = {kind: {"modules": len(rows), "mean_norm": sum(r.norm for r in rows) / len(rows),
                      "mean_effective_rank_90": sum(r.effective_rank_90 for r in rows) / len(rows),
                      "mean_effective_rank_99": sum(r.effective_rank_99 for r in rows) / len(rows)}
               for kind, rows in by_kind.items()}
    return {"adapter": str(directory), "r": config.r, "lora_alpha": config.lora_alpha,
            "base_model": config.base_model_name_or_path,
            "modules": [dataclasses.asdict(s) for s in stats], "summary": summary,
            "recommendation": recommend_rank(updates)}


def recommend_rank(updates: list[ModuleUpdate], fraction: float = 0.99) -> dict:
    """Smallest uniform rank keeping ``fraction`` of the update energy summed over all modules."""
    spectra = [u.factors()[1] ** 2 for u in updates]
    total = sum(float(s.sum()) for s in spectra) or 1.0
    trained = max((u.rank for u in updates), default=0)
    for k in range(1, trained + 1):
        kept = sum(float(s[:k].sum()) for s in spectra) / total
        if kept >= fraction:
            return {"trained_rank": trained, "rank": k, "energy_kept": kept,
                    "text": f"r={trained} trained, r={k} keeps {100 * fraction:g}% of the update energy"}
    return {"trained_rank": trained, "rank": trained, "energy_kept": 1.0, "text": f"r={trained}: keep it"}


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for i = 1..r1, j = 1..r2 (a r1×r2 grid, values in [0, 1])."""
    U1 = torch.linalg.svd(A1.double(), full_matrices=False)[2].T
    U2 = torch.linalg.svd(A2.double(), full_matrices=False)[2].T
    overlap = (U1.T @ U2) ** 2
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype).unsqueeze(1)
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype).unsqueeze(0)
    return cumulative / torch.minimum(i, j)


def compare(first: str | os.PathLike, second: str | os.PathLike) -> dict[str, torch.Tensor]:
    """phi grid per module present in both adapters; refuses adapters of different base models."""
    config1, updates1, _ = load_updates(first)
    config2, updates2, _ = load_updates(second)
    base1, base2 = config1.base_model_name_or_path, config2.base_model_name_or_path
    if base1 and base2 and base1 != base2:
        raise AdapterMismatchError(f"the adapters were made for different base models: {base1!r} vs {base2!r}.")
    second_by_path = {u.path: u for u in updates2}
    grids = {}
    for update in updates1:
        other = second_by_path.get(update.path)
        if other is None:
            continue
        if other.A.shape[1] != update.A.shape[1]:
            raise AdapterMismatchError(
                f"{update.path}: input sizes differ ({update.A.shape[1]} vs {other.A.shape[1]}); "
                "the adapters were made for different base models.")
        grids[update.path] = subspace_similarity(update.A, other.A)
    if not grids:
        raise AdapterMismatchError(f"{first} and {second} adapt no module in common; nothing to compare.")
    return grids


def _check_rank(config: LoraConfig, path: str, A: torch.Tensor, B: torch.Tensor, directory) -> None:
    """A's rows, B's columns and the config's rank for ``path`` must agree; otherwise the scaling
    (alpha / r) and every figure derived from it would be silently wrong."""
    if A.shape[0] != B.shape[1]:
        raise AdapterMismatchError(f"{directory}: {path}'s lora_A has {A.shape[0]} rows but its lora_B has "
                                   f"{B.shape[1]} columns; the adapter file is inconsistent (save it again).")
    if is_adalora(config) or config.target_parameters:
        return  # AdaLoRA's live ranks and fused experts' r × experts rows are checked where they load
    if A.shape[0] != config.rank_for(path):
        raise AdapterMismatchError(
            f"{directory}: {path} has rank {A.shape[0]} in adapter_model.safetensors but adapter_config.json says "
            f"r={config.rank_for(path)}; the two files do not belong together (copy the adapter directory whole, "
            "or fix r / rank_pattern in the config).")


def compress(directory: str | os.PathLike, output: str | os.PathLike, rank: int | None = None,
             energy: float | None = None) -> dict:
    """SVD-truncate every module's update and write a PEFT-compatible adapter (scaling folded in)."""
    if (rank is None) == (energy is None):
        raise ConfigError("pass exactly one of rank=K or energy=F (e.g. 0.99).")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}.")
    config, updates, others = load_updates(directory)
    if is_adalora(config) or config.use_dora:
        raise ConfigError(f"{directory} is a{'n AdaLoRA' if is_adalora(config) else ' DoRA'} adapter; compress "
                          "re-factors plain LoRA updates only (merge it with `lorakit merge` instead).")
    trained = max(u.rank for u in updates)
    if rank is not None and not 1 <= rank <= trained:
        raise ConfigError(f"rank {rank} is not below the adapter's rank {trained}; choose 1..{trained}.")
    tensors, ranks, rows = dict(others), {}, []
    for update in updates:
        U, S, V = update.factors()
        k = rank if rank is not None else max(1, energy_rank(S, energy))
        k = min(k, update.rank)
        B, A = (U[:, :k] * S[:k]), V[:, :k].T
        key_a, key_b = pair_keys(update.path, update.embedding)
        tensors[key_a] = A.to(update.A.dtype).contiguous()
        tensors[key_b] = B.to(update.B.dtype).contiguous()
        ranks[update.path] = k
        total = float((S ** 2).sum())
        error = (float((S[k:] ** 2).sum()) / total) ** 0.5 if total else 0.0
        rows.append({"module": update.path, "rank": update.rank, "new_rank": k, "relative_error": error})
    new_r = max(ranks.values())
    pattern = {re.escape(path): k for path, k in ranks.items() if k != new_r}
    new_config = dataclasses.replace(config, r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern=pattern,
                                     alpha_pattern=dict(pattern), inference_mode=True)
    write_adapter(output, new_config.to_peft_dict(), tensors)
    return {"adapter": str(directory), "output": str(Path(output)), "trained_rank": trained, "new_rank": new_r,
            "modules": rows, "max_relative_error": max(r["relative_error"] for r in rows),
            "recommendation": recommend_rank(updates)}
