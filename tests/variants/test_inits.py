"""PiSSA / OLoRA initialisation against the real PEFT, and the rank-2r conversion for the original base."""

import copy
import json

import peft
import pytest
import torch

import lorakit as lk
from tests.helpers import perturb_trainable, run_arch
from tests.zoo import BY_NAME

LLAMA = BY_NAME["llama"]
FIELDS = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"])


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LLAMA.build()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_and_keeps_the_model_equal_to_the_base(base, init):
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**FIELDS, init_lora_weights=init))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**FIELDS, init_lora_weights=init))
    torch.testing.assert_close(run_arch(ours, LLAMA), run_arch(base, LLAMA), atol=1e-5, rtol=0)
    q, q_peft = ours.model.layers[0].self_attn.q_proj, theirs.base_model.model.model.layers[0].self_attn.q_proj
    A, B = q.lora_pair("default")
    # singular vectors are defined up to sign: compare the rank-r product and the residual base
    torch.testing.assert_close(B @ A, q_peft.lora_B["default"].weight @ q_peft.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.base_layer.weight, q_peft.base_layer.weight, atol=1e-5, rtol=0)
    W = base.model.layers[0].self_attn.q_proj.weight
    if init == "pissa":  # the principal part: the best rank-2 approximation of W0
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(q.scaling["default"] * B @ A, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_converted_adapter_applies_to_the_original_base_in_peft(base, init, tmp_path):
    model = perturb_trainable(lk.inject(copy.deepcopy(base), lk.LoraConfig(**FIELDS, init_lora_weights=init)), 1)
    trained = run_arch(model, LLAMA)
    lk.save_adapter(model, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted")  # unmodified base
    torch.testing.assert_close(run_arch(theirs, LLAMA), trained, atol=1e-5, rtol=0)
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "converted")
    torch.testing.assert_close(run_arch(ours, LLAMA), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_plain_saves_rerun_the_init_on_load_as_peft_does(base, init, tmp_path):
    theirs = perturb_trainable(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**FIELDS, init_lora_weights=init)), 2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run_arch(ours, LLAMA), run_arch(theirs, LLAMA), atol=1e-5, rtol=0)
    lk.save_adapter(ours, tmp_path / "plain", convert_to_lora=False)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(run_arch(again, LLAMA), run_arch(theirs, LLAMA), atol=1e-5, rtol=0)


def test_bad_inits_fail_before_the_model_changes(base):
    quantized = lk.quantize(copy.deepcopy(base))
    before = [p.clone() for p in quantized.parameters()]
    with pytest.raises(lk.ConfigError, match="4-bit base"):
        lk.inject(quantized, lk.LoraConfig(**FIELDS, init_lora_weights="pissa"))
    assert all(torch.equal(a, b) for a, b in zip(before, quantized.parameters()))
    with pytest.raises(lk.ConfigError, match="init_lora_weights must be"):
        lk.LoraConfig(init_lora_weights="pissa_fast")
    gpt2 = BY_NAME["gpt2"].build()
    with pytest.raises(lk.ConfigError, match="olora .* Conv1D"):
        lk.inject(gpt2, lk.LoraConfig(target_modules=["c_attn"], init_lora_weights="olora"))
