"""add_weighted_adapter gives the same adapter as PEFT's for linear, cat and svd."""

import peft
import pytest
import torch

import lorakit as lk
from tests.conftest import logits, randomize_lora, tiny_llama

TARGETS = ["q_proj", "v_proj", "gate_proj", "embed_tokens"]


def peft_two_adapters(ranks=(4, 4)):
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=4, target_modules=TARGETS[:3],
                                           init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("combination, ranks", [("linear", (4, 4)), ("cat", (4, 2)), ("svd", (4, 2))])
def test_matches_peft(combination, ranks, ids, tmp_path):
    pm = peft_two_adapters(ranks)
    pm.save_pretrained(tmp_path)  # non-default names go to tmp_path/a and tmp_path/b
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type=combination)
    pm.set_adapter("ab")
    expected = logits(pm, ids)

    model = tiny_llama()
    lk.load_adapter(model, tmp_path / "a", "a")
    lk.load_adapter(model, tmp_path / "b", "b")
    lk.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "ab", combination=combination)
    assert "ab" in lk.list_adapters(model) and lk.active_adapters(model) == ["a"]
    lk.set_adapter(model, "ab")
    assert torch.allclose(logits(model, ids), expected, atol=1e-4)


def test_cat_is_the_exact_weighted_sum_of_updates():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), "b")
    randomize_lora(model)
    lk.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "ab", combination="cat")
    q = model.model.layers[0].self_attn.q_proj
    want = 0.5 * q.delta_weight("a") + 2.0 * q.delta_weight("b")
    assert q.rank("ab") == 6
    assert torch.allclose(q.delta_weight("ab"), want, atol=1e-5)


def test_bad_combinations():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    with pytest.raises(lk.ConfigError, match="needs equal ranks"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab")
    with pytest.raises(lk.ConfigError, match="one weight per adapter"):
        lk.add_weighted_adapter(model, ["a", "b"], [1], "ab", combination="cat")
    with pytest.raises(lk.ConfigError, match="unknown combination 'ties'"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="ties")
    with pytest.raises(lk.AdapterNotFoundError):
        lk.add_weighted_adapter(model, ["a", "x"], [1, 1], "ab", combination="cat")
    assert lk.list_adapters(model) == ["a", "b"]
