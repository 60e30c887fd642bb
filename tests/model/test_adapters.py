import pytest
import torch

import lorakit as lk
from lorakit.layers.base import LoraLayer
from tests.helpers import logits, randomize_lora, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def two_adapters():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    return randomize_lora(model)


def test_switching_changes_outputs_and_back(ids):
    model = two_adapters()
    out_a = logits(model, ids)
    lk.set_adapter(model, "b")
    out_b = logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    lk.set_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_a)


def test_disable_gives_the_base_model(ids):
    base_out = logits(tiny_llama(), ids)
    model = two_adapters()
    with lk.disable_adapters(model):
        assert torch.allclose(logits(model, ids), base_out, atol=1e-6)
    assert not torch.allclose(logits(model, ids), base_out)


def test_several_active_adapters_add(ids):
    model = two_adapters()
    base = logits(tiny_llama(), ids)
    lk.set_adapter(model, ["a", "b"])
    both = logits(model, ids)
    assert not torch.allclose(both, logits_for(model, "a", ids)) and not torch.allclose(both, base)


def logits_for(model, name, ids):
    lk.set_adapter(model, name)
    return logits(model, ids)


def test_trainability_follows_the_active_adapter():
    model = two_adapters()
    lk.set_adapter(model, "b")
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["b"].weight.requires_grad and not q.lora_A["a"].weight.requires_grad


def test_delete_removes_weights_and_unwraps_unused_layers(ids):
    model = two_adapters()
    out_a = logits(model, ids)
    lk.delete_adapter(model, "b")
    assert lk.list_adapters(model) == ["a"]
    assert "b" not in model.model.layers[0].self_attn.q_proj.adapter_names
    assert torch.equal(logits(model, ids), out_a)
    lk.delete_adapter(model, "a")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.allclose(logits(model, ids), logits(tiny_llama(), ids), atol=1e-6)


def test_unknown_adapter_names_the_known_ones():
    model = two_adapters()
    for call in (lambda: lk.set_adapter(model, "c"), lambda: lk.delete_adapter(model, "c"),
                 lambda: lk.merge(model, ["c"])):
        with pytest.raises(lk.AdapterNotFoundError, match=r"unknown adapter 'c'; the model has \['a', 'b'\]"):
            call()


def test_api_on_a_plain_model_says_what_to_do():
    with pytest.raises(lk.LoraError, match="call lk.inject"):
        lk.set_adapter(tiny_llama(), "a")


def test_rename_keeps_weights_order_and_active_state(ids):
    model = two_adapters()
    lk.set_adapter(model, "b")
    expected = logits(model, ids)
    with lk.mixed_batch(model, ["a", "b", "a", "b"], stack=["a", "b"]):
        mixed = logits(model, ids)
    lk.rename_adapter(model, "b", "c")
    assert lk.list_adapters(model) == ["a", "c"] and lk.active_adapters(model) == ["c"]
    assert torch.equal(logits(model, ids), expected)
    with lk.mixed_batch(model, ["a", "c", "a", "c"], stack=["a", "c"]):
        assert torch.equal(logits(model, ids), mixed)
    assert not any("b" in layer.adapter_names for layer in model.modules() if isinstance(layer, LoraLayer))
    with pytest.raises(lk.LoraError, match="already exists"):
        lk.rename_adapter(model, "a", "c")


def test_rename_refuses_an_adapter_with_saved_modules_before_changing_anything():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(lk.LoraError, match="ModulesToSave"):
        lk.rename_adapter(model, "default", "other")
    assert lk.list_adapters(model) == ["default"]
    assert all("default" in layer.adapter_names for layer in model.modules() if isinstance(layer, LoraLayer))
