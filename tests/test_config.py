import dataclasses
import math

import pytest

import lorakit as lk
from lorakit.config import resolve_target_modules


def test_defaults_match_peft_field_names():
    import peft

    ours = {f.name for f in dataclasses.fields(lk.LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert ours <= theirs, ours - theirs
    assert lk.LoraConfig().r == peft.LoraConfig().r == 8


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-4), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be > 0"),
    (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(bias="some"), "bias must be"),
    (dict(init_lora_weights="loftq"), "init_lora_weights"),
    (dict(target_modules="(unclosed"), "does not compile"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"),
])
def test_invalid_values_raise_clear_errors(kwargs, fragment):
    with pytest.raises(lk.ConfigError, match=fragment):
        lk.LoraConfig(**kwargs)


def test_config_is_frozen():
    cfg = lk.LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4


def test_scaling_plain_rslora_and_patterns():
    cfg = lk.LoraConfig(r=8, lora_alpha=16, rank_pattern={"value": 4}, alpha_pattern={"value": 32})
    assert cfg.scaling_for("encoder.layer.0.attention.self.query") == 2.0
    assert cfg.rank_for("encoder.layer.0.attention.self.value") == 4
    assert cfg.scaling_for("encoder.layer.0.attention.self.value") == 8.0
    rs = lk.LoraConfig(r=16, lora_alpha=16, use_rslora=True)
    assert rs.scaling_for("x") == pytest.approx(16 / math.sqrt(16))


def test_presets_follow_model_type():
    assert resolve_target_modules(lk.LoraConfig(), "llama").target_modules == ["q_proj", "v_proj"]
    assert resolve_target_modules(lk.LoraConfig(), "bert").target_modules == ["query", "value"]
    assert resolve_target_modules(lk.LoraConfig(), "gpt2").target_modules == ["c_attn"]
    with pytest.raises(lk.ConfigError, match="no preset target_modules for model type 'mystery'"):
        resolve_target_modules(lk.LoraConfig(), "mystery")


def test_peft_dict_round_trip_and_unsupported_features():
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=["head"])
    data = cfg.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["use_dora"] is False
    assert lk.LoraConfig.from_peft_dict(data) == cfg
    assert lk.LoraConfig.from_peft_dict({**data, "megatron_core": "x", "unknown_future_field": 1}) == cfg
    assert lk.LoraConfig.from_peft_dict({**data, "use_dora": True}).use_dora
    with pytest.raises(lk.ConfigError, match="lora_bias"):
        lk.LoraConfig.from_peft_dict({**data, "lora_bias": True})
    with pytest.raises(lk.ConfigError, match="peft_type 'IA3'"):
        lk.LoraConfig.from_peft_dict({**data, "peft_type": "IA3"})
