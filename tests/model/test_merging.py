import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.layers.base import LoraLayer
from lorakit.layers.modules_to_save import ModulesToSave
from tests.helpers import FAMILIES, logits, randomize_lora, tiny_bert


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_unmerge_roundtrip(family, ids):
    make, targets = FAMILIES[family]
    targets = [t for t in targets if t != "wte"]  # GPT-2's wte is tied to lm_head: see the test below
    model = make()
    base_out = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model, scale=0.2)
    adapted = logits(model, ids)
    lk.merge(model)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-4)
    assert lk.merged_adapters(model) == ["default"]
    lk.unmerge(model)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-4)
    with lk.disable_adapters(model):
        assert torch.allclose(logits(model, ids), base_out, atol=1e-4)


def test_merging_twice_is_refused(ids):
    model = randomize_lora(lk.inject(tiny_bert(), lk.LoraConfig(target_modules=["query"])))
    lk.merge(model)
    with pytest.raises(lk.MergeStateError, match="already merged; call lk.unmerge"):
        lk.merge(model)
    with pytest.raises(lk.MergeStateError, match="unmerge"):
        with lk.disable_adapters(model):
            pass


def test_safe_merge_refuses_nan_and_leaves_weights(ids):
    model = lk.inject(tiny_bert(), lk.LoraConfig(target_modules=["query", "value"]))
    randomize_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layer = model.bert.encoder.layer[1].attention.self.value
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(lk.LoraError, match=r"layer\.1\.attention\.self\.value' gives NaN/Inf weights; nothing was merged"):
        lk.merge(model, safe=True)
    assert lk.merged_adapters(model) == []
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unload_gives_plain_model_that_reloads_with_transformers(family, ids, tmp_path):
    make, targets = FAMILIES[family]
    model = make()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=[t for t in targets if t != "wte"]))
    randomize_lora(model, scale=0.2)
    adapted = logits(model, ids)
    plain = lk.unload(model, merge=True)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, ids) - adapted).abs().max() <= 1e-5


def test_unload_keeps_trained_classifier_copy(ids):
    model = lk.inject(tiny_bert(), lk.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    adapted = logits(model, ids)
    plain = lk.unload(model)
    assert isinstance(plain.classifier, torch.nn.Linear)
    assert torch.allclose(logits(plain, ids), adapted, atol=1e-6)


def test_unload_without_merge_restores_base(ids):
    base_out = logits(tiny_bert(), ids)
    model = randomize_lora(lk.inject(tiny_bert(), lk.LoraConfig(target_modules=["query"])))
    lk.merge(model)
    plain = lk.unload(model, merge=False)
    assert torch.allclose(logits(plain, ids), base_out, atol=1e-5)


def test_merging_into_a_tied_embedding_is_refused(ids):
    model = FAMILIES["gpt2"][0]()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    randomize_lora(model)
    adapted = logits(model, ids)
    with pytest.raises(lk.MergeStateError, match="'transformer.wte' shares its weight with 'lm_head.weight'"):
        lk.merge(model)
    assert lk.merged_adapters(model) == [] and torch.equal(logits(model, ids), adapted)


def test_merge_on_a_bf16_base_adds_in_fp32_and_rounds_once():
    model = tiny_bert().to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["query"]))
    randomize_lora(model, scale=0.01)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_pair("default")[0].dtype == torch.float32
    want = (layer.base_weight.float() + layer.delta_weight("default")).to(torch.bfloat16)
    lk.merge(model)
    assert layer.base_weight.dtype == torch.bfloat16 and torch.equal(layer.base_weight, want)


def test_cast_base_keeps_trainable_params_fp32_and_trains(ids):
    model = lk.inject(tiny_bert(), lk.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    lk.cast_base(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or ".modules_to_save." in n)
    assert dtypes["bert.encoder.layer.0.attention.self.query.base_layer.weight"] == torch.bfloat16
    assert dtypes["bert.embeddings.word_embeddings.weight"] == torch.bfloat16
    model.train()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    with pytest.raises(lk.ConfigError, match="cast_base takes"):
        lk.cast_base(model, torch.int8)
