"""lk.hotswap_adapter against PEFT's hotswap_adapter, and what it refuses before changing anything."""

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap

import lorakit as lk
from lorakit.layers.base import LoraLayer
from tests.helpers import logits, randomize_lora, tiny_llama

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = {  # the adapter swapped in: what differs from FIRST
    "same rank, other alpha": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "larger rank": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "smaller rank": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a subset of the modules": dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
    "rank pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    "DoRA both": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
}
# where PEFT's own hotswap (0.21) does not give what loading the adapter fresh gives, lorakit gives the
# fresh load's outputs: its scaling reads rank_pattern / alpha_pattern against the parameter's full
# key (".lora_A.default.weight"), which no pattern matches, so v_proj keeps r=4's scaling; and it
# raises KeyError on DoRA's magnitude key
PEFT_DIFFERS = {"rank pattern", "DoRA both"}


def save_peft(directory, seed, **config):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **config))
    randomize_lora(model, scale=0.3, seed=seed)
    model.save_pretrained(directory)


@pytest.mark.parametrize("case", sorted(SECOND))
def test_hotswap_gives_what_loading_the_adapter_fresh_gives_and_what_peft_hotswap_gives(case, ids, tmp_path):
    second = SECOND[case]
    first = dict(FIRST, use_dora=True) if second.get("use_dora") else FIRST
    save_peft(tmp_path / "first", 1, **first)
    save_peft(tmp_path / "second", 2, **second)
    ours = lk.load_adapter(tiny_llama(), tmp_path / "first")
    before = logits(ours, ids)
    lk.hotswap_adapter(ours, tmp_path / "second")
    fresh = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second").eval()
    assert not torch.allclose(logits(ours, ids), before, atol=1e-3)  # the swap changed something
    assert torch.allclose(logits(ours, ids), logits(fresh, ids), atol=1e-5)
    if case not in PEFT_DIFFERS:
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "first").eval()
        peft_hotswap(theirs, str(tmp_path / "second"), adapter_name="default", torch_device="cpu")
        assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)


def test_a_swap_of_equal_ranks_overwrites_the_same_tensors_and_saves_the_new_adapter(ids, tmp_path):
    save_peft(tmp_path / "first", 1, **FIRST)
    save_peft(tmp_path / "second", 2, **SECOND["same rank, other alpha"])
    model = lk.load_adapter(tiny_llama(), tmp_path / "first")
    tensors = [id(p) for layer in model.modules() if isinstance(layer, LoraLayer) for p in layer.lora_pair("default")]
    lk.hotswap_adapter(model, tmp_path / "second")
    assert [id(p) for layer in model.modules() if isinstance(layer, LoraLayer)
            for p in layer.lora_pair("default")] == tensors
    lk.save_adapter(model, tmp_path / "saved")
    assert lk.read_adapter(tmp_path / "saved")[0].lora_alpha == 16
    reloaded = lk.load_adapter(tiny_llama(), tmp_path / "saved")
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-6)


def test_mixed_batches_after_a_swap_use_the_new_weights(ids, tmp_path):
    save_peft(tmp_path / "first", 1, **FIRST)
    save_peft(tmp_path / "second", 2, **FIRST)
    model = lk.load_adapter(tiny_llama(), tmp_path / "first")
    lk.load_adapter(model, tmp_path / "first", adapter_name="other")
    with lk.mixed_batch(model, ["default"] * len(ids), stack=["default", "other"]):
        logits(model, ids)  # stacks built and cached over the first weights
    lk.hotswap_adapter(model, tmp_path / "second")
    with lk.mixed_batch(model, ["default"] * len(ids), stack=["default", "other"]):
        mixed = logits(model, ids)
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "second")
    assert torch.allclose(mixed, logits(fresh, ids), atol=1e-5)


REFUSED = {  # the adapter loaded, the one swapped in, and the error
    "other use_dora": (FIRST, dict(FIRST, use_dora=True), lk.ConfigError),
    "other dropout": (FIRST, dict(FIRST, lora_dropout=0.1), lk.ConfigError),
    "a module the first lacks": (FIRST, dict(FIRST, target_modules=["q_proj", "k_proj"]), lk.AdapterMismatchError),
    "saved modules": (FIRST, dict(FIRST, modules_to_save=["lm_head"]), lk.LoraError),
    "saved modules in the adapter swapped out": (dict(FIRST, modules_to_save=["lm_head"]), FIRST, lk.LoraError),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_swap_names_the_reason_and_leaves_the_model_as_it_was(case, ids, tmp_path):
    first, second, error = REFUSED[case]
    save_peft(tmp_path / "first", 1, **first)
    save_peft(tmp_path / "second", 2, **second)
    model = lk.load_adapter(tiny_llama(), tmp_path / "first")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, ids)
    with pytest.raises(error, match="load"):
        lk.hotswap_adapter(model, tmp_path / "second")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), before)


def test_a_merged_adapter_is_not_swapped(tmp_path):
    save_peft(tmp_path / "first", 1, **FIRST)
    model = lk.load_adapter(tiny_llama(), tmp_path / "first")
    lk.merge(model)
    with pytest.raises(lk.MergeStateError, match="unmerge"):
        lk.hotswap_adapter(model, tmp_path / "first")
