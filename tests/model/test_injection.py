import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import lorakit as lk
from lorakit.layers.linear import LoraLinear
from lorakit.layers.modules_to_save import ModulesToSave
from tests.helpers import logits, tiny_bert, tiny_gpt2, tiny_llama

QKVO = ["query", "key", "value", "attention.output.dense"]


def test_bert_base_qkvo_r8_counts_exactly_589824_lora_params():
    with torch.device("meta"):  # shape-only: no memory, no init time
        model = BertModel(BertConfig())  # BERT-base: 12 layers, hidden 768
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=QKVO))
    report = lk.trainable_parameters(model)
    assert report.lora == report.trainable == 589_824
    assert round(report.percent, 2) == 0.54  # 589,824 / 110.07M (SPEC: 0.53% of the 110M model)
    assert len(report.rows) == 48 and all(row.trainable == 12_288 for row in report.rows)


@pytest.mark.parametrize("r, count", [(4, 6_144), (8, 12_288), (16, 24_576), (64, 98_304)])
def test_one_768_projection_counts(r, count):
    model = torch.nn.Sequential(torch.nn.Linear(768, 768, bias=False))
    lk.inject(model, lk.LoraConfig(r=r, target_modules=["0"]))
    assert lk.trainable_parameters(model).lora == count


def test_llama7b_one_layer_qkvo_r8_is_262144():
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                       num_attention_heads=32, vocab_size=32000))
    lk.inject(model, lk.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert lk.trainable_parameters(model).lora == 262_144


def test_base_is_frozen_and_only_lora_trains():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = model(input_ids=torch.randint(0, 90, (2, 6)), labels=torch.randint(0, 90, (2, 6))).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)


def test_step_zero_equals_base_model(ids):
    model = tiny_gpt2()
    ref = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
    assert torch.allclose(logits(model, ids), ref, atol=1e-6)


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"bert.encoder.layer.0.attention.self.query.base_layer.bias",
                   "bert.encoder.layer.1.attention.self.query.base_layer.bias"}),
])
def test_bias_modes(bias, expected):
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], bias=bias))
    trainable_bias = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_bias == expected


def test_bias_all_trains_every_bias():
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], bias="all"))
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(p.requires_grad for p in biases)


def test_seq_cls_trains_the_classifier_copy():
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(model.classifier, ModulesToSave)
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad


def test_rank_pattern_gives_per_module_rank():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    assert model.model.layers[0].self_attn.v_proj.rank("default") == 2
    assert model.model.layers[0].self_attn.q_proj.rank("default") == 4


def test_bad_target_leaves_model_untouched():
    model = tiny_bert()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(lk.TargetNotFoundError):
        lk.inject(model, lk.LoraConfig(target_modules=["nope"]))
    with pytest.raises(lk.TargetNotFoundError, match="modules_to_save entry 'head'"):
        lk.inject(model, lk.LoraConfig(target_modules=["query"], modules_to_save=["head"]))
    assert [n for n, _ in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_duplicate_adapter_name_is_refused():
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(target_modules=["query"]))
    with pytest.raises(lk.LoraError, match="adapter 'default' already exists"):
        lk.inject(model, lk.LoraConfig(target_modules=["query"]))


def test_second_adapter_shares_the_wrapper():
    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(target_modules=["query"]), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["query", "value"]), "b")
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, LoraLinear) and query.adapter_names == ["a", "b"]
    assert lk.list_adapters(model) == ["a", "b"] and lk.active_adapters(model) == ["a"]
    assert not query.lora_A["b"].weight.requires_grad  # inactive adapters don't train


def test_injection_on_real_parameters_is_preset_for_gpt2_and_reports_table():
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(r=4))  # preset: c_attn
    report = lk.trainable_parameters(model)
    assert {row.module.rsplit(".", 1)[-1] for row in report.rows} == {"c_attn"}
    assert "trainable params" in str(report) and "c_attn" in report.table()
