"""PEFT's adapter files: their names and every key, both ways. The one place that knows them.

An adapter directory holds adapter_config.json and adapter_model.safetensors (adapter_model.bin
from older PEFT). Keys carry the module path and never the adapter name:

  <path>.lora_A.weight / .lora_B.weight       a linear layer's, convolution's or parameter's pair
  <path>.lora_embedding_A / .lora_embedding_B  an embedding's pair (plain parameters)
  <path>.lora_A / .lora_B / .lora_E            AdaLoRA's SVD form (plain parameters) and its Λ
  <path>.lora_magnitude_vector                 DoRA's magnitude
  <path>.base_layer.bias                       a LoRA layer's trained bias (bias="all"/"lora_only")
  <path>.base_layer.weight                     a saved embedding table (PEFT writes it; we read it)
  <path>.bias, <path>.<param>                  another module's bias; a saved module's tensors
  <path>.token_adapter.trainable_tokens_delta  trainable tokens' rows (k×dim, values, not differences)

each after the prefix ``base_model.model.``. ``split_tensors`` turns a file's tensors into one
``ModuleParts`` per adapted module and the rest; loading, analysis, streaming merge and GGUF
export all read files through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterMismatchError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"

# key suffix -> the part of a module's update it holds (longest suffixes first: "lora_A.weight"
# before AdaLoRA's bare "lora_A")
PART_OF_SUFFIX = (("lora_A.weight", "A"), ("lora_B.weight", "B"), ("lora_embedding_A", "A"),
                  ("lora_embedding_B", "B"), ("lora_A", "A"), ("lora_B", "B"), ("lora_E", "E"),
                  ("lora_magnitude_vector", "m"))


def pair_keys(path: str, embedding: bool, prefix: str = PREFIX) -> tuple[str, str]:
    """The keys of a module's (A, B)."""
    if embedding:
        return f"{prefix}{path}.lora_embedding_A", f"{prefix}{path}.lora_embedding_B"
    return f"{prefix}{path}.lora_A.weight", f"{prefix}{path}.lora_B.weight"


def adalora_keys(path: str, prefix: str = PREFIX) -> tuple[str, str, str]:
    """The keys of an AdaLoRA module's (A, B, Λ): plain parameters, no ``.weight``."""
    return f"{prefix}{path}.lora_A", f"{prefix}{path}.lora_B", f"{prefix}{path}.lora_E"


def magnitude_key(path: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{path}.lora_magnitude_vector"


def bias_key(path: str, wrapped: bool, prefix: str = PREFIX) -> str:
    """A trained bias: under ``base_layer`` when the module is a LoRA layer (as PEFT saves it)."""
    return f"{prefix}{path}{'.base_layer' if wrapped else ''}.bias"


def base_weight_key(path: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{path}.base_layer.weight"


def saved_key(path: str, param: str, prefix: str = PREFIX) -> str:
    """A tensor of a module trained in full (modules_to_save), under the module's own name."""
    return f"{prefix}{path}.{param}"


def token_rows_key(path: str, prefix: str = PREFIX) -> str:
    """The rows a trainable-tokens table trains (a tied output head has none of its own)."""
    return f"{prefix}{path}.token_adapter.trainable_tokens_delta"


def token_table_key(path: str, prefix: str = PREFIX) -> str:
    """The whole table, which PEFT also writes when the vocabulary was resized; we read it."""
    return f"{prefix}{path}.token_adapter.base_layer.weight"


TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def take_token_rows(others: dict[str, torch.Tensor], token_indices) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Pop the trainable-tokens rows out of ``others`` (split_tensors' rest): module path -> (the
    token ids, their rows). ``token_indices``: the config's trainable_token_indices (a list names
    the input embedding, the one table a file then holds rows for; a dict matches path suffixes)."""
    found = {}
    for key in [k for k in others if k.endswith(TOKEN_ROWS_SUFFIX)]:
        path = key.removeprefix(PREFIX).removesuffix(TOKEN_ROWS_SUFFIX)
        if isinstance(token_indices, dict):
            ids = next((v for name, v in token_indices.items() if path.endswith(name)), None)
        else:
            ids = token_indices
        if ids is None or len(ids) != others[key].shape[0]:
            raise AdapterMismatchError(f"{key} holds {others[key].shape[0]} rows but the config's "
                                       f"trainable_token_indices give {ids!r} for it; the adapter is inconsistent.")
        found[path] = (list(ids), others.pop(key))
    return found


def base_name(key: str) -> str:
    """The base checkpoint's name for a tensor the adapter replaces (a saved module's, a bias)."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


@dataclass
class ModuleParts:
    """One adapted module's tensors in a file: the update is s·B·(A⊙Λ), DoRA rescales it by m."""

    A: torch.Tensor
    B: torch.Tensor
    embedding: bool = False
    E: torch.Tensor | None = None  # AdaLoRA's singular values, r×1
    m: torch.Tensor | None = None  # DoRA's magnitude

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def folded_A(self) -> torch.Tensor:
        """A with AdaLoRA's Λ folded into its rows (A itself otherwise)."""
        return self.A if self.E is None else self.A * self.E


def module_part(key: str) -> tuple[str, str] | None:
    """(module path, part) for a key holding a piece of a LoRA update; None for the others."""
    plain = key.removeprefix(PREFIX)
    for suffix, part in PART_OF_SUFFIX:
        if plain.endswith("." + suffix):
            return plain[: -len(suffix) - 1], part
    return None


def split_tensors(tensors: dict[str, torch.Tensor], where: object = "the adapter"
                  ) -> tuple[dict[str, ModuleParts], dict[str, torch.Tensor]]:
    """(module path -> its parts, every other tensor under its file key). A module with A but no B
    (or the reverse) is an incomplete file and refused, naming ``where``."""
    found: dict[str, dict] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        located = module_part(key)
        if located is None:
            others[key] = tensor
            continue
        path, part = located
        entry = found.setdefault(path, {"embedding": False})
        entry[part] = tensor
        if part in ("A", "B") and ".lora_embedding_" in key:
            entry["embedding"] = True
    parts = {}
    for path, entry in found.items():
        if "A" not in entry or "B" not in entry:
            have = "".join(p for p in ("A", "B") if p in entry) or "E/m"
            raise AdapterMismatchError(f"{where}: module {path!r} has only lora_{have}; the file is incomplete "
                                       "(save the adapter again or copy it whole).")
        parts[path] = ModuleParts(**entry)
    return parts, others
