"""`lorakit export --format gguf`: llama.cpp's LoRA adapter GGUF, read back with the gguf package."""

import json
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.cli import main
from lorakit.io.gguf import rotary_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def peft_adapter(causal_dir, tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(causal_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 2},
        init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_gguf_names_shapes_and_values(causal_dir, peft_adapter, tmp_path, capsys):
    directory, model = peft_adapter
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(directory), "--base", causal_dir, "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    reader = gguf.GGUFReader(out)
    fields = {name: field for name, field in reader.fields.items()}
    text = lambda f: bytes(f.parts[f.data[0]]).decode()  # noqa: E731
    assert text(fields["general.type"]) == "adapter" and text(fields["adapter.type"]) == "lora"
    assert text(fields["general.architecture"]) == "llama"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base_config = json.loads((Path(causal_dir) / "config.json").read_text())
    heads, kv_heads = base_config["num_attention_heads"], base_config["num_key_value_heads"]
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    assert len(tensors) == report["tensors"] == 2 * len(TARGETS) * 2
    for layer in range(2):
        for target, short in names.items():
            module = model.base_model.model.model.layers[layer]
            module = getattr(module.self_attn if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else module.mlp,
                             target)
            A, B = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            r = A.shape[0]
            B = B * (module.scaling["default"] * r / config["lora_alpha"])  # llama.cpp scales by alpha / rank
            if target == "q_proj":
                B = rotary_rows(B, heads)
            if target == "k_proj":
                B = rotary_rows(B, kv_heads)
            a, b = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
            assert a.shape == tuple(A.shape) and b.shape == tuple(B.shape)
            np.testing.assert_allclose(a, A.numpy(), rtol=0, atol=1e-7)
            np.testing.assert_allclose(b, B.numpy(), rtol=1e-6, atol=1e-7)
    assert tensors["blk.0.ffn_down.weight.lora_a"].shape[0] == 2  # rank_pattern kept per tensor


def test_dora_and_embeddings_are_refused(causal_dir, tmp_path, capsys):
    for name, extra in (("dora", dict(use_dora=True, target_modules=["q_proj"])),
                        ("embed", dict(target_modules=["embed_tokens"]))):
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(causal_dir), peft.LoraConfig(r=2, **extra))
        model.save_pretrained(tmp_path / name)
        code = main(["export", str(tmp_path / name), "--base", causal_dir, "--output", str(tmp_path / f"{name}.gguf")])
        assert code == 2 and not (tmp_path / f"{name}.gguf").exists()
        assert ("DoRA" if name == "dora" else "cannot carry") in capsys.readouterr().err
