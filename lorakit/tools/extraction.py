"""A LoRA adapter from a full fine-tune: truncated SVD of W_tuned − W_base per linear layer.

Both checkpoints are read tensor by tensor from their safetensors files (sharded or not), so memory
stays near one layer's worth: a weight pair, its difference and that difference's SVD. Nothing of
either model is ever built except a skeleton on the meta device, which says which tensors belong
to linear layers.

Per linear layer (nn.Linear, GPT-2's Conv1D) whose weight changed, ΔW = U·S·Vᵀ is cut to rank k
(--rank k, or the smallest k keeping a share F of ‖ΔW‖²: --energy F) and written as B = U·√S,
A = √S·Vᵀ with lora_alpha = k (scaling 1). Other changed tensors (norms, embeddings, biases) are
listed; with keep_changed they are stored too: biases of adapted layers via bias="lora_only", other
modules as modules_to_save. Tensors only the tuned model has (a new classification head) are always
stored as modules_to_save, since no adapter could express them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import LoraConfig
from ..delta import balanced_factors
from ..errors import ConfigError
from ..io.checkpoint import write_adapter
from ..io.peft_format import WEIGHTS_FILE, bias_key, pair_keys, saved_key

TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


class Checkpoint:
    """The tensors of a model directory's safetensors file(s), read one at a time."""

    def __init__(self, directory: str | Path, stack: ExitStack):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ConfigError(f"{self.directory} has no model.safetensors (or sharded index); extraction reads "
                              "safetensors checkpoints: save the model with save_pretrained first.")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        # kept open for names and shapes (the header pages only); tensors are read through a fresh
        # mapping each (get), so pages read once do not stay resident for the whole run
        self.handles = {f: stack.enter_context(safe_open(self.directory / f, "pt")) for f in files}
        self.file_of = weight_map or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        self.config = json.loads((self.directory / "config.json").read_text()) \
            if (self.directory / "config.json").is_file() else {}

    def keys(self) -> list[str]:
        return list(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.file_of[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.directory / self.file_of[key], "pt") as handle:
            return handle.get_tensor(key)


def match_names(base: Checkpoint, tuned: Checkpoint) -> dict[str, str]:
    """tuned name -> base name. Checkpoints of one architecture may differ by a leading model
    prefix (a BertModel's "encoder..." is a classifier's "bert.encoder..."); the prefix pair that
    matches most names wins."""
    base_keys, tuned_keys = set(base.keys()), tuned.keys()
    prefixes = lambda keys: {""} | {k.split(".", 1)[0] + "." for k in keys if "." in k}  # noqa: E731
    best: dict[str, str] = {}
    for strip in prefixes(tuned_keys):
        for add in prefixes(base_keys):
            mapping = {k: add + k[len(strip):] for k in tuned_keys if k.startswith(strip)}
            mapping = {k: v for k, v in mapping.items() if v in base_keys}
            if len(mapping) > len(best):
                best = mapping
    if len(best) < 0.5 * len(base_keys):
        example_base = sorted(base_keys)[0]
        example_tuned = sorted(tuned_keys)[0]
        raise ConfigError(f"the checkpoints share only {len(best)} of {len(base_keys)} tensor names (e.g. base has "
                          f"{example_base!r}, tuned has {example_tuned!r}): they are not the same architecture.")
    for name, base_name in best.items():
        if tuned.shape(name) != base.shape(base_name):
            raise ConfigError(f"tensor {name!r} has shape {list(base.shape(base_name))} in the base and "
                              f"{list(tuned.shape(name))} in the tuned checkpoint: not the same architecture.")
    return best


def module_kinds(config: dict) -> dict[str, str]:
    """module path -> 'linear' / 'conv1d' / 'other', from a meta-device skeleton of the tuned model."""
    import transformers
    from torch import nn

    from ..layers.base import conv1d_class

    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ConfigError(f"the tuned model's config.json names no known architecture ({architectures}); extraction "
                          "needs it to tell linear layers from other tensors.")
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    with torch.device("meta"):
        skeleton = cls(hf_config)
    kinds = {}
    for path, module in skeleton.named_modules():
        if type(module) is nn.Linear:
            kinds[path] = "linear"
        elif isinstance(module, conv1d_class()):
            kinds[path] = "conv1d"
    return kinds


def _rank_for(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, S.numel())
    share = (S ** 2).cumsum(0) / (S ** 2).sum().clamp_min(1e-30)
    return min(int((share < energy).sum()) + 1, S.numel())


def extract(base_dir: str | Path, tuned_dir: str | Path, output: str | Path, rank: int | None = None,
            energy: float | None = None, keep_changed: bool = False, tolerance: float = 1e-6,
            extra_files: dict[str, str] | None = None) -> dict:
    """Write a PEFT-format adapter for ``base_dir`` that approximates ``tuned_dir``; returns the report."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (a fixed rank per layer) or energy (a share of ‖ΔW‖² per layer).")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be ≥ 1, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1] (e.g. 0.9 keeps 90% of each update's energy), got {energy}.")
    with ExitStack() as stack:
        base, tuned = Checkpoint(base_dir, stack), Checkpoint(tuned_dir, stack)
        names = match_names(base, tuned)
        kinds = module_kinds(tuned.config)
        tensors: dict[str, torch.Tensor] = {}
        modules, changed, ranks, lora_biases, saved = [], [], {}, {}, set()
        new = [k for k in tuned.keys() if k not in names]
        for name in tuned.keys():
            if name not in names:
                continue
            module, _, param = name.rpartition(".")
            kind = kinds.get(module)  # None: not a linear layer's tensor
            tuned_t, base_t = tuned.get(name).float(), base.get(names[name]).float()
            delta = tuned_t - base_t
            size = float(delta.norm())
            if size <= tolerance * max(float(base_t.norm()), 1.0):
                continue
            if kind in ("linear", "conv1d") and param == "weight":
                delta_out_in = delta.T if kind == "conv1d" else delta
                U, S, Vh = torch.linalg.svd(delta_out_in, full_matrices=False)
                k = _rank_for(S, rank, energy)
                A, B = balanced_factors(U, S, Vh, k)
                A_key, B_key = pair_keys(module, embedding=False)
                tensors[A_key], tensors[B_key] = A.contiguous(), B.contiguous()
                kept = float((S[:k] ** 2).sum() / (S ** 2).sum().clamp_min(1e-30))
                ranks[module] = k
                modules.append({"module": module, "shape": list(delta_out_in.shape), "rank": k,
                                "retained_energy": round(kept, 6), "relative_error": round(math.sqrt(max(0.0, 1 - kept)), 6),
                                "delta_norm": round(size, 6)})
            else:
                changed.append({"tensor": name, "relative_change": round(size / max(float(base_t.norm()), 1e-12), 6),
                                "kind": "bias of a linear layer" if kind and param == "bias" else "other"})
                if keep_changed:
                    if kind and param == "bias":
                        lora_biases[module] = tuned_t
                    else:
                        saved.add(module)
        if not modules:
            raise ConfigError(f"no linear layer differs between {base_dir} and {tuned_dir}: nothing to extract.")
        saved |= {k.rpartition(".")[0] for k in new if not k.endswith("position_ids")}
        for module in sorted(saved):
            for name in tuned.keys():
                if name.rpartition(".")[0] == module:
                    tensors[saved_key(module, name.rpartition(".")[2])] = tuned.get(name).contiguous()
        if lora_biases:  # bias="lora_only" stores every adapted layer's bias: the unchanged ones too
            for module in ranks:
                bias_name = f"{module}.bias"
                if bias_name in names:
                    tensors[bias_key(module, wrapped=True)] = lora_biases.get(module, tuned.get(bias_name).float()).contiguous()

        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: k for m, k in ranks.items() if k != common}
        architecture = (tuned.config.get("architectures") or [""])[0]
        task_type = next((t for suffix, t in TASK_TYPES.items() if architecture.endswith(suffix)), None)
        config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=pattern,
                            alpha_pattern=dict(pattern), modules_to_save=sorted(saved) or None,
                            bias="lora_only" if lora_biases else "none", task_type=task_type,
                            fan_in_fan_out=any(kinds.get(m) == "conv1d" for m in ranks),
                            base_model_name_or_path=str(base_dir))
        data = config.to_peft_dict()
        data["inference_mode"] = True
        write_adapter(output, data, tensors, extra_files=extra_files)
    energies = [m["retained_energy"] for m in modules]
    return {"output": str(output), "rank": rank, "energy": energy, "r": common, "rank_pattern": pattern,
            "modules": modules, "changed_not_linear": changed, "stored_modules_to_save": sorted(saved),
            "stored_biases": bool(lora_biases), "new_in_tuned": new,
            "adapter_bytes": (Path(output) / WEIGHTS_FILE).stat().st_size,
            "mean_retained_energy": round(sum(energies) / len(energies), 6),
            "min_retained_energy": min(energies),
            "max_relative_error": max(m["relative_error"] for m in modules)}
