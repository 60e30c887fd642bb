"""Any lorakit adapter as the plain LoRA that vLLM serves: `lora_A` / `lora_B` pairs, one rank, one
alpha, nothing else in the file or the config.

vLLM applies plain LoRA only (no DoRA, no AdaLoRA's Λ, no modules to save or trainable tokens), so:

- plain LoRA with rank_pattern / alpha_pattern / rsLoRA: each module's scaling is folded into its
  B and every pair zero-padded to the largest rank R, with lora_alpha = R (scaling 1): exact;
- AdaLoRA: Λ folded into A's rows, the pruned triplets (Λ = 0) dropped, then as above: exact;
- DoRA: its update is not low-rank in general (the magnitude rescales every column of W0 + sBA),
  so ΔW = merged − W0 is computed from the base weights, as `lorakit merge` computes it, and cut to
  a truncated SVD: B' = U·√S, A' = √S·Vᵀ at the smallest rank whose dropped singular values are all
  ≤ tolerance × the largest (or a rank given); each module's rank and error are reported;
- PiSSA / OLoRA adapters are saved converted already (rank 2r, for the original base); one saved
  for the residual base is refused, as are modules saved in full and trained biases (merge them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LoraConfig
from ..delta import balanced_factors
from ..errors import ConfigError
from ..variants.adalora import is_adalora
from .checkpoint import read_adapter, write_adapter
from .model_files import checkpoint_entries, read_entry
from .peft_format import ModuleParts, pair_keys, split_tensors
from .runs import trained_on_4bit

DEFAULT_TOLERANCE = 1e-3


def _refuse_what_vllm_cannot_serve(config: LoraConfig, others: dict, adapter_dir) -> None:
    if config.modules_to_save or any(".modules_to_save." in key for key in others):
        raise ConfigError(f"{adapter_dir} trains modules in full ({', '.join(config.modules_to_save or ['saved modules'])}, "
                          "e.g. a classifier head), which vLLM does not load from a LoRA adapter: merge the adapter "
                          "into the base instead (`lorakit merge`) and serve the merged model")
    if config.trainable_token_indices is not None:
        raise ConfigError(f"{adapter_dir} trains token embedding rows (trainable_token_indices), which vLLM does not "
                          "load from a LoRA adapter: merge the adapter into the base instead (`lorakit merge`) and "
                          "serve the merged model")
    if others:
        key = next(iter(others))
        raise ConfigError(f"{adapter_dir} holds {key}, which a plain LoRA adapter cannot carry (vLLM reads lora_A / "
                          "lora_B only): merge the adapter into the base instead (`lorakit merge`)")
    init = config.init_lora_weights
    if isinstance(init, str) and init not in ("gaussian",):
        raise ConfigError(f"{adapter_dir} was saved for the {init}-initialised residual base, not the original one: "
                          "save it converted (lorakit's default; PEFT's path_initial_model_for_weight_conversion) "
                          "and export that")


def _base_weight(entries: dict, path: str, base_dir) -> torch.Tensor:
    """The base's weight of module ``path`` (a task model's checkpoint may lack the first name part)."""
    for name in (f"{path}.weight", f"{path.split('.', 1)[-1]}.weight"):
        if name in entries:
            return read_entry(entries[name])
    raise ConfigError(f"the base {base_dir} has no weight for {path}: the adapter was made for another base model")


def dora_update(parts: ModuleParts, weight: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """ΔW = merged − W0 of a DoRA module (out×in), by the arithmetic `lorakit merge` uses."""
    from .streaming_merge import merged_tensor

    merged = merged_tensor(weight.float(), parts, scaling, transposed).float()
    update = merged - weight.float()
    return update.T if transposed else update


def truncated_pair(update: torch.Tensor, rank: int | None, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(A, B) of the best rank-k approximation of ``update`` (Eckart–Young), k = ``rank`` or the
    fewest singular values with every dropped one ≤ tolerance × the largest; and what was lost."""
    U, S, Vh = torch.linalg.svd(update.double(), full_matrices=False)
    top = float(S[0]) if S.numel() else 0.0
    k = rank if rank is not None else max(1, int((S > tolerance * top).sum()))
    k = min(k, S.numel())
    A, B = balanced_factors(U, S, Vh, k)
    dropped = float(S[k]) if k < S.numel() else 0.0
    frobenius = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt()) if top else 0.0
    return A.float(), B.float(), {"rank": k, "relative_spectral_error": dropped / top if top else 0.0,
                                  "relative_frobenius_error": frobenius}


def plain_pairs(config: LoraConfig, parts: dict[str, ModuleParts], base_dir=None, rank: int | None = None,
                tolerance: float = DEFAULT_TOLERANCE, qlora: bool = False) -> tuple[dict, dict]:
    """Module path -> (A, B) with s·B·A equal to the module's update (B carries the scaling), and
    module path -> {rank, errors} for the modules an SVD cut (DoRA)."""
    pairs, cut = {}, {}
    entries = None
    for path, part in parts.items():
        scaling = config.scaling_for(path)
        if part.m is not None:
            if base_dir is None:
                raise ConfigError("a DoRA adapter's update depends on the base weights: give --base (the base model "
                                  "it was trained on)")
            if part.embedding or part.A.dim() != 2:
                raise ConfigError(f"{path}: only linear layers' DoRA updates are converted to plain LoRA; merge this "
                                  "adapter instead (`lorakit merge`)")
            entries = entries if entries is not None else checkpoint_entries(base_dir)
            weight = _base_weight(entries, path, base_dir)
            if qlora:  # the update was learned against the 4-bit base: the merge's arithmetic on it
                from .streaming_merge import through_4bit

                weight = through_4bit(weight).to(weight.dtype)
            A, B, cut[path] = truncated_pair(dora_update(part, weight, scaling, bool(config.fan_in_fan_out)),
                                             rank, tolerance)
            pairs[path] = (A, B)
            continue
        A = part.folded_A().float()
        B = part.B.float() * scaling
        if part.E is not None:  # AdaLoRA: a pruned triplet (Λ = 0) adds nothing
            live = part.E.flatten() != 0
            A, B = A[live], B[:, live]
        pairs[path] = (A, B)
    return pairs, cut


def export_vllm(adapter_dir: str | Path, output: str | Path, base_dir: str | Path | None = None,
                rank: int | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write ``adapter_dir`` as a plain LoRA adapter vLLM serves (see the module docstring)."""
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be ≥ 1, got {rank}")
    if not 0 < tolerance < 1:
        raise ConfigError(f"--tolerance must be in (0, 1), got {tolerance}")
    config, tensors = read_adapter(adapter_dir)
    parts, others = split_tensors(tensors, adapter_dir)
    _refuse_what_vllm_cannot_serve(config, others, adapter_dir)
    pairs, cut = plain_pairs(config, parts, base_dir, rank, tolerance, qlora=trained_on_4bit(Path(adapter_dir)))
    common = max(1, max(A.shape[0] for A, _ in pairs.values()))
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    state = {}
    for path, (A, B) in pairs.items():
        pad = common - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, *A.shape[1:])]) if pad else A
        B = torch.cat([B, B.new_zeros(B.shape[0], pad, *B.shape[2:])], dim=1) if pad else B
        key_a, key_b = pair_keys(path, parts[path].embedding)
        state[key_a], state[key_b] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    # leaf names, as vLLM expects them; a module they match that the file lacks gets B = 0 in PEFT
    leaves = sorted({path.rsplit(".", 1)[-1] for path in pairs})
    data = LoraConfig(r=common, lora_alpha=common, target_modules=leaves, task_type=config.task_type,
                      fan_in_fan_out=config.fan_in_fan_out,
                      base_model_name_or_path=config.base_model_name_or_path).to_peft_dict()
    data["inference_mode"] = True
    write_adapter(output, data, state)
    source = "adalora" if is_adalora(config) else ("dora" if config.use_dora else "lora")
    worst = max((row["relative_spectral_error"] for row in cut.values()), default=0.0)
    full = [path for path, row in cut.items() if row["rank"] * 2 >= min(pairs[path][0].shape[1], pairs[path][1].shape[0])]
    hint = None
    if full:  # DoRA's rescaling of W0's columns is a full-rank change once the magnitude has moved
        hint = (f"{len(full)} of {len(cut)} DoRA modules need at least half their full rank: the plain LoRA is about "
                "as large as the weights it adapts; serving a merged model (`lorakit merge`) costs less")
    return {"output": str(output), "source": source, "r": common, "lora_alpha": common, "modules": len(pairs),
            "exact": not cut, "svd_modules": cut, "max_relative_spectral_error": worst, "hint": hint}

