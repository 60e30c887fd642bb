"""PEFT's key names, both ways: what lorakit writes for each kind of module parses back to the same
module and part, and the literal keys are PEFT's (a regression table: a change here breaks files)."""

import pytest
import torch

import lorakit as lk
from lorakit.errors import AdapterMismatchError
from lorakit.io.peft_format import (
    adalora_keys,
    base_name,
    bias_key,
    magnitude_key,
    module_part,
    pair_keys,
    saved_key,
    split_tensors,
)
from tests.helpers import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("key, expected", [
    (pair_keys("model.layers.0.self_attn.q_proj", embedding=False),
     ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")),
    (pair_keys("model.embed_tokens", embedding=True),
     ("base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B")),
    (adalora_keys("h.0.attn.c_attn"), ("base_model.model.h.0.attn.c_attn.lora_A", "base_model.model.h.0.attn.c_attn.lora_B",
                                       "base_model.model.h.0.attn.c_attn.lora_E")),
    (magnitude_key("x.q"), "base_model.model.x.q.lora_magnitude_vector"),
    (bias_key("x.q", wrapped=True), "base_model.model.x.q.base_layer.bias"),
    (bias_key("x.norm", wrapped=False), "base_model.model.x.norm.bias"),
    (saved_key("score", "weight"), "base_model.model.score.weight"),
])
def test_the_keys_are_peft_s(key, expected):
    assert key == expected


def test_every_key_lorakit_writes_parses_back_to_its_module_and_part():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True))
    state = lk.adapter_state_dict(model)
    parts, others = split_tensors(state)
    layers = {path for path, module in model.named_modules() if isinstance(module, lk.LoraLayer)}
    assert set(parts) == layers and not others
    for path, part in parts.items():
        layer = model.get_submodule(path)
        A, B = layer.lora_pair("default")
        assert torch.equal(part.A, A) and torch.equal(part.B, B) and torch.equal(part.m, layer.lora_magnitude_vector["default"])
        assert part.embedding == isinstance(layer, lk.LoraEmbedding)
        key_a, key_b = pair_keys(path, part.embedding)
        assert module_part(key_a) == (path, "A") and module_part(key_b) == (path, "B")


def test_saved_modules_and_biases_stay_outside_the_parts_under_their_base_names():
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]))
    parts, others = split_tensors(lk.adapter_state_dict(model))
    assert set(parts) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    names = {base_name(k) for k in others}
    assert names == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias", "transformer.ln_f.weight",
                     "transformer.ln_f.bias"}
    assert all(name in dict(tiny_gpt2().named_parameters()) for name in names)


def test_a_module_with_half_its_pair_is_an_incomplete_file():
    key_a, _ = pair_keys("x.q", embedding=False)
    with pytest.raises(AdapterMismatchError, match="'x.q' has only lora_A"):
        split_tensors({key_a: torch.zeros(2, 4)}, "some/adapter")
