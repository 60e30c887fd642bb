"""Streaming merge: a sharded checkpoint merged shard by shard equals the in-memory merge."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.io.streaming_merge import stream_merge
from tests.helpers import randomize_lora, tiny_llama


def sharded_base(tmp_path, dtype=torch.float32):
    model = tiny_llama().to(dtype)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "base", max_shard_size="10KB")
    return tmp_path / "base", AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)


CONFIGS = {
    "lora": lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                          rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"]),
    "dora": lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True),
    "adalora": lk.AdaLoraConfig(target_modules=["q_proj", "up_proj"], init_r=4, target_r=2, total_step=10),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_merge_equals_the_in_memory_merge(kind, dtype, tmp_path):
    base_dir, base = sharded_base(tmp_path, dtype)
    assert len(json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(base_dir.glob("*.safetensors"))) >= 3
    adapted = lk.inject(copy.deepcopy(base), CONFIGS[kind])
    randomize_lora(adapted, scale=0.3)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_E" in name or "modules_to_save" in name:
                param.normal_(0, 0.3)
    lk.save_adapter(adapted, tmp_path / "adapter")
    report = stream_merge(tmp_path / "adapter", base_dir, tmp_path / "merged")
    assert report["shards"] == len(list(base_dir.glob("*.safetensors")))
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype).state_dict()
    in_memory = lk.unload(lk.load_adapter(copy.deepcopy(base), tmp_path / "adapter")).state_dict()
    assert streamed.keys() == in_memory.keys()
    changed = 0
    for key in streamed:
        if kind == "lora":  # the same fp32 arithmetic, rounded once: bit for bit
            assert torch.equal(streamed[key], in_memory[key]), key
        else:
            torch.testing.assert_close(streamed[key], in_memory[key], rtol=1e-5, atol=1e-6 if dtype == torch.float32
                                       else 1e-2)
        changed += not torch.equal(streamed[key], base.state_dict()[key])
    assert changed >= 4


def test_a_missing_shard_or_another_base_is_named_and_nothing_written(tmp_path):
    base_dir, base = sharded_base(tmp_path)
    adapted = lk.inject(copy.deepcopy(base), CONFIGS["lora"])
    lk.save_adapter(adapted, tmp_path / "adapter")
    other = tmp_path / "other"
    small = tiny_llama(layers=1)
    small.config.tie_word_embeddings = False
    small.save_pretrained(other)
    with pytest.raises(lk.ConfigError, match="does not hold"):
        stream_merge(tmp_path / "adapter", other, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    victim = sorted(base_dir.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(lk.ConfigError, match=f"shard {victim.name}.*missing"):
        stream_merge(tmp_path / "adapter", base_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_merge_with_base_streams(tmp_path, capsys):
    from lorakit.cli import main

    base_dir, base = sharded_base(tmp_path)
    adapted = lk.inject(copy.deepcopy(base), CONFIGS["lora"])
    randomize_lora(adapted)
    lk.save_adapter(adapted, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--base", str(base_dir), "--output", str(tmp_path / "m"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] >= 3
    ids = torch.randint(0, 90, (2, 6))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_qlora_adapter_merges_into_the_dequantized_base(dtype, tmp_path):
    """What `lorakit merge RUN` does in memory for a QLoRA run (quantize, load, dequantize, merge),
    streamed: every linear weight but the head goes through NF4 and back, adapted or not."""
    base_dir, base = sharded_base(tmp_path, dtype)
    trained = lk.inject(lk.quantize(copy.deepcopy(base).float()), lk.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomize_lora(trained, scale=0.3)
    lk.save_adapter(trained, tmp_path / "adapter")
    (tmp_path / "adapter" / "lorakit_run.json").write_text(json.dumps({"qlora": True}))
    report = stream_merge(tmp_path / "adapter", base_dir, tmp_path / "merged")
    assert report["qlora"]
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype).state_dict()
    reference = lk.load_adapter(lk.quantize(copy.deepcopy(base).float()), tmp_path / "adapter")
    in_memory = lk.unload(lk.dequantize(reference), merge=True).to(dtype).state_dict()
    assert streamed.keys() == in_memory.keys()
    for key in streamed:
        assert torch.equal(streamed[key], in_memory[key]), key
    untouched = "model.layers.0.self_attn.k_proj.weight"  # not adapted, still seen through 4 bits
    assert not torch.equal(streamed[untouched], base.state_dict()[untouched])
    assert torch.equal(streamed["lm_head.weight"], base.state_dict()["lm_head.weight"])


def test_a_corrupt_index_or_a_base_of_other_shapes_is_named_and_nothing_written(tmp_path):
    base_dir, base = sharded_base(tmp_path)
    lk.save_adapter(lk.inject(copy.deepcopy(base), CONFIGS["lora"]), tmp_path / "adapter")
    wider = tmp_path / "wider"  # same tensor names, another hidden size
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**base.config.to_dict(), "intermediate_size": 96})
    model = LlamaForCausalLM(config)
    model.save_pretrained(wider)
    with pytest.raises(lk.ConfigError, match=r"update for model\.layers\.0\.\S+ has shape \(\d+, \d+\) but the base's "
                                             r"tensor has shape \(\d+, \d+\)"):
        stream_merge(tmp_path / "adapter", wider, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (base_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(lk.ConfigError, match="not a valid safetensors index"):
        stream_merge(tmp_path / "adapter", base_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_token_rows_are_merged_as_in_memory(tmp_path, tied):
    model = tiny_llama()
    model.config.tie_word_embeddings = tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 0.5)
    else:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "base", max_shard_size="10KB")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    indices = [3, 40] if tied else {"embed_tokens": [3, 40], "lm_head": [7]}
    adapted = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, target_modules=["q_proj"],
                                                           trainable_token_indices=indices))
    randomize_lora(adapted, scale=0.3)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()
    lk.save_adapter(adapted, tmp_path / "adapter")
    report = stream_merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    assert report["replaced"] == (1 if tied else 2)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    in_memory = lk.unload(lk.load_adapter(copy.deepcopy(base), tmp_path / "adapter")).state_dict()
    for key in streamed:
        assert torch.equal(streamed[key], in_memory[key]), key
    assert not torch.equal(streamed["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])
    # an adapter whose run added tokens cannot be merged into the smaller table on file
    grown = copy.deepcopy(base)
    grown.resize_token_embeddings(base.config.vocab_size + 2)
    lk.inject(grown, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[base.config.vocab_size]))
    lk.save_adapter(grown, tmp_path / "grown")
    with pytest.raises(lk.ConfigError, match="added tokens"):
        stream_merge(tmp_path / "grown", tmp_path / "base", tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()
