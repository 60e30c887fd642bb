"""add_weighted_adapter gives the same adapter as PEFT's, for every combination type."""

import peft
import pytest
import torch

import lorakit as lk
from tests.helpers import logits, randomize_lora, tiny_llama

TARGETS = ["q_proj", "v_proj", "gate_proj", "embed_tokens"]


def peft_two_adapters(ranks=(4, 4)):
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=4, target_modules=TARGETS[:3],
                                           init_lora_weights=False))
    return model.eval()


EQUAL = (4, 4)  # the factor-wise methods need equal ranks
CASES = [
    ("linear", EQUAL, {}), ("cat", (4, 2), {}), ("svd", (4, 2), {}), ("svd", (4, 2), {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", EQUAL, {"density": 0.5}), ("ties", EQUAL, {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", (4, 2), {"density": 0.5}), ("magnitude_prune", EQUAL, {"density": 0.4}),
    ("magnitude_prune_svd", (4, 2), {"density": 0.7}),
    # random (DARE): the same seed gives the same draws, in the same order, as PEFT's
    ("dare_linear", EQUAL, {"density": 0.5}), ("dare_ties", EQUAL, {"density": 0.6}),
    ("dare_linear_svd", (4, 2), {"density": 0.5}), ("dare_ties_svd", (4, 2), {"density": 0.5}),
]


@pytest.mark.parametrize("combination, ranks, extra", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft(combination, ranks, extra, ids, tmp_path):
    pm = peft_two_adapters(ranks)
    pm.save_pretrained(tmp_path)  # non-default names go to tmp_path/a and tmp_path/b
    torch.manual_seed(7)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type=combination, **extra)
    pm.set_adapter("ab")
    expected = logits(pm, ids)

    model = tiny_llama()
    lk.load_adapter(model, tmp_path / "a", "a")
    lk.load_adapter(model, tmp_path / "b", "b")
    torch.manual_seed(7)
    lk.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "ab", combination_type=combination, **extra)
    assert "ab" in lk.list_adapters(model) and lk.active_adapters(model) == ["a"]
    lk.set_adapter(model, "ab")
    assert torch.allclose(logits(model, ids), expected, atol=1e-4)
    with lk.disable_adapters(model):
        assert not torch.allclose(logits(model, ids), expected, atol=1e-3)  # the combination does something


def test_default_is_peft_svd(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    lk.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")  # unequal ranks: fine for svd
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank("ab") == 4


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
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="linear")
    with pytest.raises(lk.ConfigError, match="one weight per adapter"):
        lk.add_weighted_adapter(model, ["a", "b"], [1], "ab", combination="cat")
    with pytest.raises(lk.ConfigError, match="unknown combination 'tie'"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="tie")
    with pytest.raises(lk.ConfigError, match="needs equal ranks"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="ties", density=0.5)
    for density in (None, 0, -0.1, 1.5):
        with pytest.raises(lk.ConfigError, match="density"):
            lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="ties_svd", density=density)
    with pytest.raises(lk.ConfigError, match="majority_sign_method"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="ties_svd", density=0.5,
                                majority_sign_method="most")
    with pytest.raises(lk.ConfigError, match="already exists"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "a", combination="cat")
    with pytest.raises(lk.AdapterNotFoundError):
        lk.add_weighted_adapter(model, ["a", "x"], [1, 1], "ab", combination="cat")
    assert lk.list_adapters(model) == ["a", "b"]


def test_dora_adapters_are_refused():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "a")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with pytest.raises(lk.ConfigError, match="uses DoRA"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="cat")
    assert lk.list_adapters(model) == ["a", "b"]


def test_adalora_adapters_are_refused():
    model = tiny_llama()
    lk.inject(model, lk.AdaLoraConfig(target_modules=["q_proj"], total_step=10, inference_mode=True), "a")
    lk.inject(model, lk.LoraConfig(r=8, target_modules=["q_proj"]), "b")
    with pytest.raises(lk.ConfigError, match="is AdaLoRA"):
        lk.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", combination="cat")
