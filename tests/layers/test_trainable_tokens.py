"""Trainable tokens (PEFT's trainable_token_indices) against the installed peft: files both ways,
outputs, training only the chosen rows, merge, mixed batches, bad input."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import ConfigError, LoraError, TargetNotFoundError
from lorakit.kernels.losses import causal_lm_loss, supports_chunked_loss
from lorakit.layers.trainable_tokens import TrainableTokens
from tests.helpers import VOCAB, logits, tiny_llama

IDS = [3, 17, 40]
INPUT = torch.tensor([[3, 5, 17, 40, 9, 3, 2], [40, 40, 1, 17, 6, 7, 8]])


def tied_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _rows(model, seed):
    """Give every trainable-tokens table's rows new values (they start as the base rows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def _peft_model(base, indices=IDS, seed=1):
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices,
                                                      init_lora_weights=False))
    _rows(model, seed)
    return model.eval()


@pytest.mark.parametrize("make, indices", [(tied_llama, IDS), (tiny_llama, {"embed_tokens": IDS, "lm_head": [5, 9]})])
def test_peft_adapter_loads_with_equal_outputs(tmp_path, make, indices):
    reference = _peft_model(make(), indices)
    reference.save_pretrained(tmp_path)
    expected = logits(reference, INPUT)
    model = lk.load_adapter(make(), tmp_path)
    assert isinstance(model.model.embed_tokens, TrainableTokens) and isinstance(model.lm_head, TrainableTokens)
    torch.testing.assert_close(logits(model, INPUT), expected, atol=1e-5, rtol=1e-5)
    # the rows change what the model computes (or the comparison above proves nothing)
    assert (logits(make(), INPUT) - expected).abs().max() > 1e-2


def test_tied_head_predicts_through_the_trained_rows(tmp_path):
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    _rows(model, 2)
    assert model.lm_head.tied_to is model.model.embed_tokens
    hidden = model.model(INPUT).last_hidden_state
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    torch.testing.assert_close(logits(model, INPUT)[..., IDS], (hidden @ rows.T).detach(), atol=1e-5, rtol=1e-5)
    assert lk.adapter_state_dict(model).keys() >= {"base_model.model.model.embed_tokens.token_adapter."
                                                   "trainable_tokens_delta"}
    assert not any("lm_head" in k for k in lk.adapter_state_dict(model))  # the tied head stores nothing


@pytest.mark.parametrize("make", [tied_llama, tiny_llama])
def test_our_adapter_loads_in_peft_with_equal_outputs(tmp_path, make):
    model = lk.inject(make(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS,
                                            init_lora_weights=False))
    _rows(model, 3)
    lk.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(reference, INPUT), logits(model, INPUT), atol=1e-5, rtol=1e-5)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(reference))


def test_training_moves_only_the_chosen_rows():
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    model.train()
    base_table = model.model.embed_tokens.original_module.weight.detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "model.embed_tokens.trainable_tokens_delta.default" in trainable
    assert not any("original_module" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = model.model.embed_tokens.trainable_tokens_delta["default"].detach().clone()
    loss = model(input_ids=INPUT, labels=INPUT).loss
    loss.backward()
    optimizer.step()
    after = model.model.embed_tokens.trainable_tokens_delta["default"].detach()
    assert (after - before).abs().amax(dim=1).min() > 0  # every chosen row learned
    assert torch.equal(model.model.embed_tokens.original_module.weight, base_table)  # the table did not


def test_chunked_loss_reads_the_rows_through_a_tied_head():
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    _rows(model, 4)
    assert supports_chunked_loss(model)
    chunked = causal_lm_loss(model, INPUT, INPUT)
    torch.testing.assert_close(chunked, model(input_ids=INPUT, labels=INPUT).loss, atol=1e-5, rtol=1e-5)
    chunked.backward()
    assert model.model.embed_tokens.trainable_tokens_delta["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("make", [tied_llama, tiny_llama])
def test_merge_unmerge_and_unload_equal_peft(tmp_path, make):
    config = lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS, init_lora_weights=False)
    model = lk.inject(make(), config)
    _rows(model, 5)
    lk.save_adapter(model, tmp_path)
    adapted = logits(model, INPUT)
    lk.merge(model)
    torch.testing.assert_close(logits(model, INPUT), adapted, atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    with lk.disable_adapters(model):
        torch.testing.assert_close(logits(model, INPUT), logits(make(), INPUT))
    plain = lk.unload(model, merge=True)
    assert isinstance(plain.model.embed_tokens, torch.nn.Embedding) and isinstance(plain.lm_head, torch.nn.Linear)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).merge_and_unload()
    torch.testing.assert_close(plain.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    torch.testing.assert_close(plain.lm_head.weight, reference.lm_head.weight)
    torch.testing.assert_close(logits(plain, INPUT), adapted, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_use_their_own_tokens(tmp_path):
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS,
                                                  init_lora_weights=False), adapter_name="a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[17, 60],
                                   init_lora_weights=False), adapter_name="b")
    _rows(model, 6)
    expected = []
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        expected.append(logits(model, INPUT[:1]))
    with lk.disable_adapters(model):
        expected.append(logits(model, INPUT[:1]))
    batch = INPUT[:1].repeat(3, 1)
    with lk.mixed_batch(model, ["a", "b", "__base__"]):
        mixed = logits(model, batch)
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-5, rtol=1e-5)
    # and as PEFT computes the same mixed batch
    for name in ("a", "b"):
        lk.save_adapter(model, tmp_path / name, adapter_name=name)
    reference = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "a", adapter_name="a")
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        peft_mixed = reference.eval()(input_ids=batch, adapter_names=["a", "b", "__base__"]).logits
    torch.testing.assert_close(mixed, peft_mixed, atol=1e-5, rtol=1e-5)


def test_two_active_adapters_on_one_table_are_refused():
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[50]), "b")
    with pytest.raises(LoraError, match="both train token rows"):
        lk.set_adapter(model, ["a", "b"])


@pytest.mark.parametrize("config, error, message", [
    (dict(trainable_token_indices=[3, VOCAB]), ConfigError, "outside 'model.embed_tokens'"),
    (dict(trainable_token_indices={"embed_tokenz": [3]}), TargetNotFoundError, "matches no module"),
    (dict(trainable_token_indices=[3], target_modules=["q_proj", "embed_tokens"]), ConfigError, "has LoRA"),
    (dict(trainable_token_indices=[3], modules_to_save=["embed_tokens"]), ConfigError, "trained in full"),
    (dict(trainable_token_indices=[3, 3]), ConfigError, "twice"),
    (dict(trainable_token_indices=[-1]), ConfigError, "non-negative"),
])
def test_bad_token_indices_fail_before_the_model_changes(config, error, message):
    model = tied_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        lk.inject(model, lk.LoraConfig(**{"target_modules": ["q_proj"], **config}))
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reports_count_the_rows_once_and_combining_refuses_them():
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]), "b")
    report = lk.trainable_parameters(model)
    assert [(row.module, row.trainable) for row in report.rows if row.kind == "tokens"] == [
        ("model.embed_tokens", len(IDS) * 32)]
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        lk.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab")


def test_deleting_the_last_token_adapter_gives_the_plain_modules_back():
    model = lk.inject(tied_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[50]), "b")
    lk.delete_adapter(model, "a")
    assert model.model.embed_tokens.adapter_names == ["b"] and model.lm_head.adapter_names == ["b"]
    lk.delete_adapter(model, "b")
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
