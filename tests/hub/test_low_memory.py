"""Loading straight into 4 bits (hub/low_memory.py): equal to from_pretrained + lk.quantize bit for
bit, without ever calling from_pretrained; bad checkpoints and models too large refused first."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.hub import low_memory
from lorakit.hub.models import load_model
from lorakit.io.model_files import INDEX
from lorakit.io.streaming_merge import stream_merge
from lorakit.kernels.nf4 import Linear4bit


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, causal_dir):  # noqa: F811
    """The tiny Llama (untied head, biased projections) as bf16 shards of a few KB each."""
    directory, causal_dir = tmp_path_factory.mktemp("sharded-llama"), Path(causal_dir)
    torch.manual_seed(3)
    config = LlamaConfig.from_pretrained(causal_dir)
    config.tie_word_embeddings, config.attention_bias = False, True
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size="8KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((causal_dir / name).read_bytes())
    assert len(json.loads((directory / INDEX).read_text())["weight_map"]) > 10
    return directory


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, causal_dir):  # noqa: F811
    """The tiny Llama with its head tied to the embedding, in one file (the head has no tensor)."""
    directory, causal_dir = tmp_path_factory.mktemp("tied-llama"), Path(causal_dir)
    config = LlamaConfig.from_pretrained(causal_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(4)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((causal_dir / name).read_bytes())
    return directory


def no_full_load(monkeypatch):
    """from_pretrained raising: proves the 4-bit path never builds the full-precision model."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called")
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["sharded_dir", "tied_dir"])  # sharded and untied; one file and tied
def test_a_4bit_load_equals_from_pretrained_then_quantize_bit_for_bit(request, monkeypatch, fixture, compute):
    directory = request.getfixturevalue(fixture)
    usual, _ = load_model(str(directory), "lm")
    lk.quantize(usual, compute_dtype=compute)
    no_full_load(monkeypatch)
    streamed, _ = load_model(str(directory), "lm", quantize=compute)
    expected, got = usual.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), key
    assert sum(isinstance(m, Linear4bit) for m in streamed.modules()) == 14
    assert not streamed.training
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == torch.bfloat16):
        assert torch.equal(usual(input_ids=ids).logits, streamed(input_ids=ids).logits)
    if fixture == "tied_dir":  # the tied head is the embedding, not a copy
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def test_a_classifier_loads_in_4bit_with_a_new_head(sharded_dir, monkeypatch, capsys):
    usual, _ = load_model(str(sharded_dir), "classify", ["neg", "pos"])
    lk.quantize(usual)
    capsys.readouterr()
    no_full_load(monkeypatch)
    streamed, _ = load_model(str(sharded_dir), "classify", ["neg", "pos"], quantize=torch.float32)
    assert "classification head (score, 2 labels) is new" in capsys.readouterr().err
    expected, got = usual.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        if not key.startswith("score."):
            assert torch.equal(expected[key], got[key]), key
    head = streamed.score.weight
    assert head.shape == (2, 32) and torch.isfinite(head).all() and head.abs().sum() > 0 and head.requires_grad


def test_qlora_training_loads_the_base_in_4bit_without_the_full_model(sharded_dir, tmp_path, monkeypatch):
    from lorakit.training.loop import Trainer
    from tests.helpers import review_rows, train_options
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["text"], "response": "yes"}) + "\n" for r in review_rows(24)))
    no_full_load(monkeypatch)
    trainer = Trainer(train_options(str(sharded_dir), str(data), tmp_path / "run", task="sft", qlora=True,
                                    max_steps=2, batch_size=4), quiet=True)
    assert sum(isinstance(m, Linear4bit) for m in trainer.model.modules()) == 14
    trainer.run()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def broken_copy(source, target, damage):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    damage(target)
    return target


def _drop_shard(d):
    sorted(d.glob("model-*.safetensors"))[1].unlink()


def _truncate_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _index_names_absent(d):
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (d / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("damage, message", [(_drop_shard, "but the file is missing"),
                                             (_truncate_shard, "is truncated: tensor"),
                                             (_index_names_absent, "names tensor model.layers.9.mlp.up_proj.weight")])
def test_a_broken_checkpoint_is_refused_before_loading_or_merging(sharded_dir, tmp_path, damage, message, adapter_for):
    broken = broken_copy(sharded_dir, tmp_path / "broken", damage)
    with pytest.raises(ConfigError, match=message):
        load_model(str(broken), "lm", quantize=torch.float32)
    with pytest.raises(ConfigError, match=message):
        stream_merge(adapter_for(sharded_dir), broken, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.fixture
def adapter_for(tmp_path):
    def make(base_dir):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
        lk.save_adapter(model, tmp_path / "adapter")
        return tmp_path / "adapter"
    return make


def test_a_model_larger_than_the_memory_available_is_refused_with_what_would_fit(sharded_dir, monkeypatch):
    params = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(sharded_dir).state_dict().values())
    monkeypatch.setattr(low_memory, "available_bytes", lambda: int(params * 2.5))  # bf16 fits, fp32 does not
    with pytest.raises(ConfigError) as refused:
        load_model(str(sharded_dir), "lm")
    text = str(refused.value)
    assert f"{params / 1e9:.2f}B parameters" in text and "as float32 weights" in text
    assert "bf16 (" in text and "4-bit (--qlora)" in text and "fp32 (" not in text
    load_model(str(sharded_dir), "lm", dtype=torch.bfloat16)  # what it suggests works
    load_model(str(sharded_dir), "lm", quantize=torch.float32)


def test_a_bert_base_checkpoint_loads_under_its_task_prefix_in_4bit(classifier_dir, monkeypatch):  # noqa: F811
    """The encoder's checkpoint names tensors without ``bert.``; the classifier's model with it."""
    usual, _ = load_model(str(classifier_dir), "classify", ["a", "b", "c"])
    lk.quantize(usual)
    no_full_load(monkeypatch)
    streamed, _ = load_model(str(classifier_dir), "classify", ["a", "b", "c"], quantize=torch.float32)
    expected, got = usual.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected if not k.startswith("classifier."))
    assert sum(isinstance(m, Linear4bit) for m in streamed.modules()) > 0
