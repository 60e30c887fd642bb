"""LoftQ against the installed peft and bitsandbytes: the same NF4 codes, the same A, B and base
weights as PEFT's loftq_init on the same weights, the 4-bit path, and its bad input."""

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.kernels.nf4 import Linear4bit
from lorakit.variants.loftq import layer_round_trip, loftq_factors, nf4_round_trip
from tests.helpers import logits, tiny_gpt2

bnb = pytest.importorskip("bitsandbytes")
INPUT = torch.tensor([[3, 5, 17, 40, 9, 3, 2]])


def llama(seed=0):
    # widths that are multiples of 64: bitsandbytes' CPU dequantize mis-reads blocks that span rows
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def peft_loftq_on_cpu(monkeypatch):
    """PEFT's own loftq_init, unchanged. Since PEFT 0.22 it computes on the device PEFT infers, the CPU
    here (earlier releases hard-wired cuda / xpu, and these tests ran its source with that replaced)."""
    from peft.utils import loftq_utils

    assert loftq_utils.infer_device() == "cpu", "the reference must run where lorakit's factors are computed"
    return loftq_utils.loftq_init


def test_nf4_codes_are_bitsandbytes_codes():
    from lorakit.kernels.nf4 import NF4_CODE

    weight = torch.randn(96, 128) * 0.05
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1, 64).long()
    theirs = (NF4_CODE[codes] * state.absmax.unsqueeze(1)).view(weight.shape)
    assert torch.equal(nf4_round_trip(weight), theirs)
    assert torch.equal(nf4_round_trip(weight), bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_factors_equal_peft(monkeypatch, iters):
    peft_init = peft_loftq_on_cpu(monkeypatch)
    weight = torch.randn(96, 128) * 0.05
    Q, A, B = peft_init(weight, num_bits=4, reduced_rank=8, num_iter=iters)
    _, ours_Q, ours_A, ours_B = loftq_factors(weight, 8, iters)
    assert torch.equal(Q, ours_Q) and torch.equal(A, ours_A) and torch.equal(B, ours_B)


@pytest.mark.parametrize("iters", [1, 2])
def test_inject_equals_peft_loftq_model(monkeypatch, iters):
    peft_loftq_on_cpu(monkeypatch)
    targets = ["q_proj", "v_proj", "down_proj"]
    reference = peft.get_peft_model(llama(), peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=targets, init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iters))).eval()
    model = lk.inject(llama(), lk.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="loftq",
                                             loftq_config={"loftq_bits": 4, "loftq_iter": iters}))
    ours = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v
              for k, v in reference.state_dict().items()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(logits(model, INPUT), logits(reference, INPUT))


def test_loftq_absorbs_quantization_error():
    weight = llama().model.layers[0].mlp.down_proj.weight.detach()
    errors = []
    for iters in (1, 2, 4):
        _, Q, A, B = loftq_factors(weight, 16, iters)
        errors.append(float((weight - Q - B @ A).norm() / (weight - nf4_round_trip(weight)).norm()))
    assert errors[0] < 0.95 and errors[-1] <= errors[0]  # rank 16 of 64 takes a share of the error


def test_on_a_4bit_model_the_full_weights_come_from_the_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.hub.low_memory import load_4bit

    llama().save_pretrained(tmp_path / "base")
    model, _ = load_4bit(tmp_path / "base", AutoModelForCausalLM, AutoConfig.from_pretrained(tmp_path / "base"),
                         torch.float32, torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    packed = layer.packed.clone()
    config = lk.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    lk.inject(model, config)
    wrapped = model.model.layers[0].self_attn.q_proj
    assert torch.equal(wrapped.base_layer.packed, packed)  # one round: the base stays NF4(W) as loaded
    weight = llama().model.layers[0].self_attn.q_proj.weight.detach()
    Q = wrapped.base_layer.dequantized_weight(torch.float32)
    torch.testing.assert_close(Q, layer_round_trip(weight))
    A, B = wrapped.lora_pair("default")
    assert (weight - Q - B @ A).norm() < 0.95 * (weight - Q).norm()
    _, _, want_A, want_B = loftq_factors(weight, 4, 1, layer_round_trip)
    assert torch.equal(A.detach(), want_A) and torch.equal(B.detach(), want_B)


def test_bad_loftq_input_fails_before_the_model_changes():
    with pytest.raises(ConfigError, match="needs loftq_config"):
        lk.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="8-bit bases are not implemented"):
        lk.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ConfigError, match="loftq_iter must be a positive"):
        lk.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    gpt2 = tiny_gpt2()
    with pytest.raises(ConfigError, match="Conv1D"):
        lk.inject(gpt2, lk.LoraConfig(target_modules=["c_attn"], **loftq))
    quantized = lk.quantize(llama())  # quantized in memory: the full weights are gone
    before = copy.deepcopy(quantized.state_dict())
    with pytest.raises(ConfigError, match="no longer holds its full-precision weight"):
        lk.inject(quantized, lk.LoraConfig(target_modules=["q_proj"], **loftq))
    assert all(torch.equal(before[k], v) for k, v in quantized.state_dict().items())
    assert not any(isinstance(m, lk.LoraLayer) for m in quantized.modules())


def test_train_options_for_loftq(causal_dir, sft_jsonl):
    from lorakit.training.options import resolve_options

    with pytest.raises(ConfigError, match="needs --qlora"):
        resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", init="loftq"))
    options = resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", init="loftq", qlora=True, r=8))
    config = options.lora_config()
    assert (config.init_lora_weights, config.loftq_config, config.lora_alpha) == (
        "loftq", {"loftq_bits": 4, "loftq_iter": 1}, 8.0)  # alpha r: scaling 1, as LoftQ's factors assume
    saved = config.to_peft_dict()
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert lk.LoraConfig.from_peft_dict(saved).init_lora_weights is True  # loading never re-runs it (as PEFT)
