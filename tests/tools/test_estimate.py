"""SPEC.md's figure table, reproduced from configs alone."""

import json
import subprocess
import sys

import pytest
import torch

import lorakit as lk
from lorakit.tools import estimate as est


def run(preset, **kwargs):
    return est.estimate(est.load_config(preset), **kwargs)


def test_bert_base_qkvo_r8():
    result = run("bert-base-uncased", r=8)
    assert result.lora_params == 589_824
    assert result.model_params == 109_482_240
    assert f"{result.percent:.3f}" == "0.536"  # SPEC: 0.53% (of ~110M)
    assert result.per_target == {"query": 147_456, "key": 147_456, "value": 147_456, "dense": 147_456}


@pytest.mark.parametrize("r, count, pct", [(4, 6_144, 1.04), (8, 12_288, 2.08), (16, 24_576, 4.17), (64, 98_304, 16.67)])
def test_one_bert_projection(r, count, pct):
    lora, base, percent = est.single_projection(768, 768, r)
    assert (lora, base, round(percent, 2)) == (count, 589_824, pct)
    assert base / est.single_projection(768, 768, 8)[0] == 48


def test_one_4096_projection():
    lora, _, percent = est.single_projection(4096, 4096, 8)
    assert lora == 65_536 and round(percent, 2) == 0.39


def test_llama7b_per_layer_and_full_finetune_memory():
    result = run("llama-7b", r=8, dtype="fp16", batch_size=2, seq_len=1024)
    assert result.per_layer == 262_144 and result.lora_params == 32 * 262_144
    full, lora, qlora = result.memory
    gb = 1e9
    # SPEC: weights 14 GB + Adam 28 GB + grads 14 GB + activations ≈ 76 GB (with a nominal 7B count)
    assert full.weights / gb == pytest.approx(13.5, abs=0.1)
    assert full.gradients / gb == pytest.approx(13.5, abs=0.1)
    assert full.optimizer / gb == pytest.approx(27.0, abs=0.1)
    assert full.total / gb == pytest.approx(76, rel=0.05)
    assert lora.gradients + lora.optimizer < 0.2 * gb  # "LoRA states tens of MB"
    assert qlora.weights < 0.3 * lora.weights


def test_gpt3_175b_r4_on_wq_wv():
    result = run("gpt3-175b", r=4, targets=["q_proj", "v_proj"])
    assert result.model_params == pytest.approx(175e9, rel=0.01)
    assert result.lora_params == 96 * 2 * 4 * (12288 + 12288)  # 18,874,368 ≈ 18.9M
    assert 35e6 <= result.adapter_bytes_fp16 <= 38e6


def test_nf4_overhead_is_qloras_figure():
    assert round(est.NF4_BITS_PER_WEIGHT, 3) == 4.127


def test_config_file_and_bad_inputs(tmp_path):
    cfg = est.load_config("minilm")
    cfg.save_pretrained(tmp_path)
    assert est.estimate(est.load_config(config_path=str(tmp_path / "config.json"))).lora_params == 147_456
    with pytest.raises(lk.ConfigError, match="unknown preset 'llama-9b'; presets: bert-base-uncased"):
        est.load_config("llama-9b")
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(lk.ConfigError, match="needs at least model_type"):
        est.load_config(config_path=str(tmp_path / "bad.json"))
    with pytest.raises(lk.ConfigError, match="not found"):
        est.load_config(model_dir=str(tmp_path / "missing"))


@pytest.mark.slow
def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "lorakit", "estimate", "--preset", "llama-7b", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["per_layer"] == 262_144 and [m["method"] for m in data["memory"]] == ["full", "lora", "qlora"]


def test_chunked_loss_holds_the_logits_of_one_chunk():
    from lorakit.kernels.losses import CHUNK_ELEMENTS
    from lorakit.tools.estimate import estimate, load_config

    config = load_config("smollm2-135m")
    full, chunked = (estimate(config, batch_size=4, seq_len=512, chunked_loss=c).memory[1].activations
                     for c in (False, True))
    chunk_tokens = CHUNK_ELEMENTS[torch.float32] // config.vocab_size
    assert full - chunked == 16 * (4 * 512 - chunk_tokens) * config.vocab_size


def test_per_process_memory_under_ddp_and_fsdp():
    """DDP copies everything into each process; FSDP splits weights, gradients and optimizer states
    N ways and adds what is whole at a time (the root unit and two decoder blocks)."""
    config = est.load_config("llama-7b")
    one = {row.method: row for row in est.estimate(config, r=8).memory}
    ddp = {row.method: row for row in est.estimate(config, r=8, nproc=4).memory}
    fsdp = {row.method: row for row in est.estimate(config, r=8, nproc=4, fsdp=True).memory}
    assert ddp["lora"].total == one["lora"].total
    for method in ("full", "lora", "qlora"):
        assert fsdp[method].optimizer == one[method].optimizer // 4
        assert fsdp[method].activations == one[method].activations
    # LLaMA-7B: 32 blocks of 202.4M parameters, 262M outside them (embeddings, head, norm)
    gathered = (262_148_096 + 2 * 202_383_360) / 6_738_415_616
    expected = one["full"].weights / 4 + one["full"].weights * gathered * 3 / 4
    assert abs(fsdp["full"].weights - expected) <= 1
    assert fsdp["lora"].weights < 0.35 * one["lora"].weights
    with pytest.raises(lk.ConfigError, match="at least 2 with fsdp"):
        est.estimate(config, nproc=1, fsdp=True)
