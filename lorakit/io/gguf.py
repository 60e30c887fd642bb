"""A LoRA adapter as llama.cpp's adapter GGUF (`llama-server --lora FILE`, Ollama's ADAPTER), written with
the `gguf` package the way llama.cpp's convert_lora_to_gguf.py writes it:

- metadata general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (one float);
- per adapted weight, "<gguf name>.lora_a" (r×in) and "<gguf name>.lora_b" (out×r), the names from
  gguf's tensor-name map for the architecture ("model.layers.0.self_attn.q_proj" -> "blk.0.attn_q");
- on Llama-family models, the rows of q_proj's and k_proj's B in llama.cpp's rotary order (the
  same permutation its converter applies to the base weights).

llama.cpp scales every tensor by alpha / its own rank, so per-module scalings (rank_pattern with
alpha_pattern, rsLoRA) are folded into B, which keeps the adapter's effect exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..variants.adalora import is_adalora
from .atomic import staged_file
from .checkpoint import read_adapter
from .peft_format import split_tensors


def _arches():
    import gguf

    llama = gguf.MODEL_ARCH.LLAMA
    return {"LlamaForCausalLM": llama, "MistralForCausalLM": llama, "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2}


def rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for a Llama q/k projection: within each head, the two rotary halves
    interleaved (its converter's `permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(adapter_dir: str | Path, base_dir: str | Path, output: str | Path, outtype: str = "f32") -> dict:
    import gguf

    config, tensors = read_adapter(adapter_dir)
    if is_adalora(config) or config.use_dora:
        raise ConfigError("llama.cpp applies plain LoRA only: this adapter uses "
                          f"{'AdaLoRA' if is_adalora(config) else 'DoRA'}; merge it into the base instead "
                          "(`lorakit merge`) and convert the merged model.")
    if outtype not in ("f32", "f16"):
        raise ConfigError(f"--outtype must be f32 or f16, got {outtype!r}")
    base_config_path = Path(base_dir) / "config.json"
    if not base_config_path.is_file():
        raise ConfigError(f"{base_dir} has no config.json: --base must be the base model's directory (its config is "
                          "enough; no weights are read)")
    base_config = json.loads(base_config_path.read_text())
    architecture = (base_config.get("architectures") or ["?"])[0]
    arch = _arches().get(architecture)
    if arch is None:
        raise ConfigError(f"GGUF export supports {', '.join(_arches())}; the base is {architecture}")
    name_map = gguf.get_tensor_name_map(arch, base_config["num_hidden_layers"])
    heads, kv_heads = base_config["num_attention_heads"], base_config.get("num_key_value_heads") or \
        base_config["num_attention_heads"]

    pairs, others = split_tensors(tensors, adapter_dir)
    carried = [path for path, part in pairs.items() if part.embedding]
    if others or carried:
        key = next(iter(others)) if others else f"{carried[0]}.lora_embedding_A"
        raise ConfigError(f"{adapter_dir} holds {key}, which llama.cpp's LoRA format cannot carry (only linear "
                          "layers' lora_A / lora_B: no embeddings, biases or modules_to_save)")
    alpha = float(config.lora_alpha)
    dtype = torch.float32 if outtype == "f32" else torch.float16
    written = []
    with staged_file(output) as staging:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, pair in pairs.items():
            name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if name is None:
                raise ConfigError(f"{module} has no llama.cpp tensor name for {architecture}; leave it out of the adapter")
            A, B = pair.A.float(), pair.B.float()
            B = B * (config.scaling_for(module) * A.shape[0] / alpha)  # llama.cpp's scale is alpha / rank
            if arch == gguf.MODEL_ARCH.LLAMA and module.endswith("q_proj"):
                B = rotary_rows(B, heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and module.endswith("k_proj"):
                B = rotary_rows(B, kv_heads)
            for suffix, tensor in ((".lora_a", A), (".lora_b", B)):
                writer.add_tensor(name + suffix, tensor.to(dtype).contiguous().numpy())
                written.append(name + suffix)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"output": str(output), "tensors": len(written), "alpha": alpha, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "bytes": os.path.getsize(output)}
