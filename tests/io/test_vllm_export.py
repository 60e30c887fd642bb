"""`lorakit export --format vllm`: a plain LoRA (lora_A / lora_B, one r and alpha) whose effect, loaded
by PEFT, equals the source adapter's (exactly, or within the reported SVD error for DoRA)."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.io.vllm_export import export_vllm
from tests.helpers import randomize_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(2, 12, (2, 12), generator=torch.Generator().manual_seed(0))


def plain_lora_loader(directory):
    """What a plain-LoRA server accepts (vLLM's rules): only lora_A / lora_B weights, one r and
    alpha, no DoRA, rsLoRA, patterns, saved modules or biases. Returns (r, alpha, tensors)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config.get("use_dora") and not config.get("use_rslora")
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("modules_to_save")
    assert config.get("bias", "none") == "none"
    tensors = load_file(directory / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert tensor.shape[0 if "lora_A" in key else 1] == config["r"], key
    return config["r"], config["lora_alpha"], tensors


def peft_logits(base_dir, adapter_dir):
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_peft_adapter(base_dir, path, config, magnitude_noise=0.0):
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            if "lora_magnitude_vector" in name:  # a trained magnitude: no longer the weight's norms
                param.mul_(1 + magnitude_noise * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def test_patterns_and_rslora_become_one_rank_and_alpha_exactly(causal_dir, tmp_path):
    source = saved_peft_adapter(causal_dir, tmp_path / "src", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
        use_rslora=True, init_lora_weights=False))
    result = export_vllm(source, tmp_path / "vllm")
    r, alpha, _ = plain_lora_loader(tmp_path / "vllm")
    assert result["exact"] and r == alpha == result["r"] == 4 and result["modules"] == 2 * len(TARGETS)
    torch.testing.assert_close(peft_logits(causal_dir, tmp_path / "vllm"), peft_logits(causal_dir, source),
                               atol=1e-5, rtol=1e-5)


def test_adalora_folds_its_singular_values_and_drops_pruned_triplets(causal_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(causal_dir)
    lk.inject(model, lk.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, total_step=10,
                                      task_type="CAUSAL_LM"))
    randomize_lora(model, scale=0.3)
    with torch.no_grad():  # prune: half the triplets of every module off, as the allocator leaves them
        for name, param in model.named_parameters():
            if name.endswith("lora_E.default"):
                param[3:] = 0
    lk.save_adapter(model, tmp_path / "src")
    result = export_vllm(tmp_path / "src", tmp_path / "vllm")
    r, _, _ = plain_lora_loader(tmp_path / "vllm")
    assert result["source"] == "adalora" and result["exact"] and r == 3
    torch.testing.assert_close(peft_logits(causal_dir, tmp_path / "vllm"), peft_logits(causal_dir, tmp_path / "src"),
                               atol=1e-5, rtol=1e-5)


def test_dora_is_cut_by_svd_within_the_reported_error(causal_dir, tmp_path, capsys):
    source = saved_peft_adapter(causal_dir, tmp_path / "src", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False), magnitude_noise=0.05)
    reference = peft_logits(causal_dir, source)
    assert main(["export", str(source), "--format", "vllm", "--base", causal_dir, "--output",
                 str(tmp_path / "vllm"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    r, _, _ = plain_lora_loader(tmp_path / "vllm")
    assert result["source"] == "dora" and not result["exact"] and r == result["r"] > 4  # the magnitude adds rank
    assert result["max_relative_spectral_error"] <= 1e-3 and len(result["svd_modules"]) == 2 * len(TARGETS)
    close = (peft_logits(causal_dir, tmp_path / "vllm") - reference).abs().max()
    export_vllm(source, tmp_path / "low", causal_dir, rank=2)
    coarse = (peft_logits(causal_dir, tmp_path / "low") - reference).abs().max()
    assert close < 1e-3 < coarse  # the tolerance's rank answers as DoRA does; rank 2 visibly does not


def test_what_vllm_cannot_serve_is_refused_with_the_alternative(causal_dir, tmp_path):
    with_head = saved_peft_adapter(causal_dir, tmp_path / "head", peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    with pytest.raises(ConfigError, match=r"trains modules in full .*merge the adapter .*`lorakit merge`"):
        export_vllm(with_head, tmp_path / "out")
    dora = saved_peft_adapter(causal_dir, tmp_path / "dora", peft.LoraConfig(
        r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    with pytest.raises(ConfigError, match="give --base"):
        export_vllm(dora, tmp_path / "out")
    assert not (tmp_path / "out").exists()
