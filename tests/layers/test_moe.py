"""target_parameters: LoRA on MoE experts stored as fused 3-D parameters, against the real PEFT."""

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.param import LoraParam
from tests.zoo import BY_NAME, main_output

MIXTRAL = BY_NAME["mixtral-moe"]


def run(model):
    with torch.no_grad():
        return main_output(model(**MIXTRAL.inputs()))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return MIXTRAL.build()


def test_explicit_target_parameters_round_trip_with_peft(base, tmp_path):
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.down_proj", "gate_up_proj"],
                  init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(ours), run(theirs), atol=1e-5, rtol=0)
    experts = ours.model.layers[0].mlp.experts
    # PEFT's nesting: one wrapper per parameter, the first-registered (gate_up_proj) innermost
    assert isinstance(experts, LoraParam) and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"
    assert experts.lora_A["default"].weight.shape == (2 * 4, 32)  # r·experts × in

    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run(back), run(ours), atol=1e-5, rtol=0)


def test_expert_update_is_per_expert_b_times_a(base):
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, lora_alpha=2, target_parameters=["down_proj"],
                                                         init_lora_weights=False))
    layer = model.model.layers[0].mlp.experts
    A, B = layer.lora_pair("default")
    A3, B3 = A.view(4, 2, -1), B.view(B.shape[0], 2, 4)  # experts × r × in, out × r × experts
    for e in range(4):
        torch.testing.assert_close(layer.delta_weight("default")[e], B3[:, :, e] @ A3[e])
    before = layer.base_weight.detach().clone()
    lk.merge(model)
    torch.testing.assert_close(layer.base_weight, before + layer.delta_weight("default"))
    lk.unmerge(model)
    torch.testing.assert_close(layer.base_weight, before)


def test_training_reaches_the_expert_factors(base):
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"]))
    model.train()
    out = model(**MIXTRAL.inputs(), labels=MIXTRAL.inputs()["input_ids"])
    out.loss.backward()
    layer = model.model.layers[0].mlp.experts
    assert layer.lora_B["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_bad_target_parameters_fail_before_the_model_changes(base):
    model = copy.deepcopy(base)
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(lk.TargetNotFoundError, match=r"target_parameters \['up_proj'\] matched no parameter.*"
                                                     r"experts.gate_up_proj"):
        lk.inject(model, lk.LoraConfig(target_parameters=["up_proj"]))
    assert [n for n, _ in model.named_modules()] == before
    with pytest.raises(lk.ConfigError, match="lora_dropout"):
        lk.LoraConfig(target_parameters=["down_proj"], lora_dropout=0.1)
    with pytest.raises(lk.ConfigError, match="fused parameter"):  # PEFT's rule: w1 and w3 are one tensor now
        lk.inject(model, lk.LoraConfig(target_modules=["w1", "q_proj"]))


def test_a_model_without_adaptable_layers_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(lk.TargetNotFoundError, match="matched no module"):
        lk.inject(model, lk.LoraConfig(target_modules="all-linear"))


QWEN_MOE = BY_NAME["qwen2-moe"]


@pytest.mark.parametrize("targets", [
    "all-linear",                                  # the fused experts and the router join the linear layers
    ["down_proj", "q_proj"],                       # a shared expert's linear down_proj keeps its LoRA, and the
                                                   # experts' fused down_proj of the same name is adapted too
    ["gate_proj", "up_proj"],                      # a fused pair: r and alpha double on gate_up_proj
    r"model\.layers\.0\.(self_attn\.q_proj|mlp\.experts\.gate_proj|mlp\.experts\.up_proj)",  # a regex widens to leaf names
], ids=["all-linear", "shared-and-routed", "fused-pair", "regex"])
def test_moe_targets_convert_as_peft_does(targets):
    """PEFT >= 0.22 rewrites v4 expert names on transformers-v5 Qwen2-MoE; lorakit picks the same layers."""
    torch.manual_seed(0)
    base = QWEN_MOE.build()
    fields = dict(r=2, lora_alpha=4, target_modules=targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**fields))
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, lk.LoraLayer)) == adapted
    assert any(".experts" in n for n in adapted), "the case must reach the fused experts"
    config, their_config = ours._lorakit_registry.configs["default"], theirs.peft_config["default"]
    assert set(config.target_parameters) == set(their_config.target_parameters)
    assert config.rank_pattern == their_config.rank_pattern and config.alpha_pattern == their_config.alpha_pattern
