"""PEFT format both ways, against the real peft package, plus file-level failure modes."""

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.layers.base import LoraLayer
from tests.helpers import FAMILIES, logits, randomize_lora, tiny_bert, tiny_llama

CASES = {  # family -> extra config: covers Linear, Conv1D, Embedding, heads, patterns, rsLoRA
    "bert": dict(task_type="SEQ_CLS"),
    "gpt2": dict(use_rslora=True),
    "llama": dict(rank_pattern={"v_proj": 2}, alpha_pattern={"gate_proj": 3}),
}


def peft_model(family, init=False, **extra):
    make, targets = FAMILIES[family]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **extra)
    return peft.get_peft_model(make(), cfg).eval()


@pytest.mark.parametrize("family", sorted(CASES))
def test_lorakit_adapter_loads_in_peft_with_same_outputs(family, ids, tmp_path):
    make, targets = FAMILIES[family]
    model = lk.inject(make(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **CASES[family]))
    randomize_lora(model, scale=0.2)
    if family == "bert":
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ad").eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_adapter_loads_in_lorakit_with_same_outputs(family, ids, tmp_path):
    pm = peft_model(family, **CASES[family])
    if family == "bert":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path / "ad")
    model = lk.load_adapter(FAMILIES[family][0](), tmp_path / "ad")
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)


def test_file_keys_and_config_are_peft_style(tmp_path):
    model = randomize_lora(lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])))
    lk.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert not any("default" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "embed_tokens"]


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_is_written_as_names_peft_reads_identically(ids, tmp_path, task_type):
    config = lk.LoraConfig(r=2, target_modules="all-linear", task_type=task_type)
    model = randomize_lora(lk.inject(tiny_bert(), config), 0.1)
    lk.save_adapter(model, tmp_path)
    names = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    # as PEFT: without a task type the classifier is one more linear layer; SEQ_CLS saves it whole
    assert isinstance(names, list) and ("classifier" in names) == (task_type is None)
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-5)


def test_save_load_roundtrip_between_adapters(ids, tmp_path):
    model = randomize_lora(lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path)
    lk.load_adapter(model, tmp_path, adapter_name="copy")
    assert lk.list_adapters(model) == ["default", "copy"] and lk.active_adapters(model) == ["default"]
    lk.set_adapter(model, "copy")
    assert torch.allclose(logits(model, ids), expected, atol=1e-6)
    q = model.model.layers[0].self_attn.q_proj
    assert not q.lora_A["copy"].weight.requires_grad  # loaded for inference unless is_trainable
    lk.load_adapter(model, tmp_path, adapter_name="train_me", is_trainable=True)
    lk.set_adapter(model, "train_me")
    assert q.lora_A["train_me"].weight.requires_grad


def test_adapter_for_another_base_model_names_key_and_shapes(tmp_path):
    small = randomize_lora(lk.inject(tiny_bert(hidden=32), lk.LoraConfig(r=4, target_modules=["query"])))
    lk.save_adapter(small, tmp_path)
    other = tiny_bert(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lk.AdapterMismatchError,
                       match=r"bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight has shape \(4, 32\) "
                             r"in the adapter but the model needs \(4, 48\)"):
        lk.load_adapter(other, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_adapter_with_fewer_layers_is_refused(tmp_path):
    lk.save_adapter(lk.inject(tiny_llama(layers=2), lk.LoraConfig(target_modules=["q_proj"])), tmp_path)
    with pytest.raises(lk.AdapterMismatchError, match=r"no tensor base_model\.model\.model\.layers\.2\.self_attn"):
        lk.load_adapter(tiny_llama(layers=3), tmp_path)


def test_corrupt_and_truncated_files(tmp_path):
    lk.save_adapter(lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"])), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(lk.AdapterFileError, match="corrupt or truncated"):
        lk.load_adapter(tiny_llama(), tmp_path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(lk.AdapterFileError, match="corrupt or truncated"):
        lk.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lk.AdapterFileError, match="not valid JSON"):
        lk.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(lk.AdapterFileError, match="adapter_config.json not found"):
        lk.load_adapter(tiny_llama(), tmp_path / "missing")


def test_unexpected_tensor_is_refused(tmp_path):
    lk.save_adapter(lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"])), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, path)
    with pytest.raises(lk.AdapterMismatchError, match="nonexistent.lora_A.weight, which matches nothing"):
        lk.load_adapter(tiny_llama(), tmp_path)


def test_mixed_key_prefixes_are_refused(tmp_path):
    lk.save_adapter(lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"])), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)
    save_file(tensors, path)
    with pytest.raises(lk.AdapterFileError, match="mixed key prefixes"):
        lk.load_adapter(tiny_llama(), tmp_path)


def test_a_crash_while_saving_leaves_no_half_written_adapter(tmp_path, monkeypatch):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    import lorakit.io.checkpoint as ckpt

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(model, tmp_path / "ad")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    lk.save_adapter(model, tmp_path / "ad")
    good = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(model, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ad"]


@pytest.mark.slow
def test_a_killed_save_leaves_staging_that_the_next_save_removes(tmp_path):
    """kill -9 during save_adapter: the adapter stays intact and the next save sweeps the leftovers."""
    import subprocess
    import sys
    import textwrap

    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    good = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, lorakit as lk, lorakit.io.checkpoint as ckpt
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = lk.inject(LlamaForCausalLM(cfg), lk.LoraConfig(target_modules=["q_proj"]))
        ckpt.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies mid-save
        lk.save_adapter(model, {str(tmp_path / "ad")!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".ad.tmp-")]
    assert len(leftovers) == 1 and (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == good
    live = tmp_path / f".ad.tmp-{os.getpid()}-inflight"  # a concurrent writer that is still running
    live.mkdir()
    lk.save_adapter(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path)) == sorted(["ad", live.name])


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_travel_both_ways_with_peft(bias, tmp_path):
    """PEFT keeps a LoRA layer's bias under <path>.base_layer.bias; a trained bias must survive the trip."""
    from tests.helpers import tiny_bert

    model = tiny_bert()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query", "value"], bias=bias))
    randomize_lora(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param += 0.1
    lk.save_adapter(model, tmp_path / "ours")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    want = logits(model.eval(), ids)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    assert torch.allclose(logits(theirs, ids), want, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lk.load_adapter(tiny_bert(), tmp_path / "theirs").eval()
    assert torch.allclose(logits(ours, ids), want, atol=1e-6)
    assert not torch.allclose(logits(tiny_bert().eval(), ids), want, atol=1e-3)
