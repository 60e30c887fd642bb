"""Packed prefill: the prompts of one prefill forward laid end to end in one row, each attending to
its own slot only; every reply stays equal to offline `generate`, and a model whose packed forward
differs keeps padded prefill."""

from types import SimpleNamespace

import pytest
import torch

from lorakit.serving import continuous
from lorakit.serving.attention import use_grouped_attention
from lorakit.serving.packed_prefill import packing, placeholder_mask, use_packed_prefill
from lorakit.serving.prefill_groups import adapter_groups
from lorakit.serving.prefix_cache import BLOCK
from lorakit.serving.slot_cache import PackedPlan, SlotCache, cache_keyword, slot_cache_fits, slot_forward
from tests.helpers import answers_as_offline, make_engine, tiny_llama
from tests.zoo import ZOO

SHARED = "the film was really good and the plot was very dull but the actor is quite lovely and the music "


def packed_logits(model, prompts, prefixes):
    """Each prompt's last logits from one packed forward, prompt i after its first prefixes[i]
    tokens were put in its slot by an ordinary forward."""
    cache = SlotCache(model.config, len(prompts), torch.float32, torch.device("cpu"))
    keyword = cache_keyword(model)
    with torch.inference_mode():
        for slot, (ids, prefix) in enumerate(zip(prompts, prefixes)):
            if prefix:
                slot_forward(model, cache, slot, ids[:prefix])
        plan = cache.plan_packed(0, prefixes, [len(ids) - prefix for ids, prefix in zip(prompts, prefixes)])
        with packing(plan):
            out = model(input_ids=torch.cat([ids[prefix:] for ids, prefix in zip(prompts, prefixes)]).unsqueeze(0),
                        attention_mask=placeholder_mask(plan, torch.float32), use_cache=True,
                        position_ids=plan.positions().unsqueeze(0), logits_to_keep=plan.last_tokens(),
                        **{keyword: cache})
    return out.logits[0]


def test_each_packed_prompt_gets_its_own_forwards_logits():
    model = tiny_llama(layers=3)
    assert use_grouped_attention(model)
    on, note = use_packed_prefill(model)
    assert on and note.startswith("on")
    prompts = [torch.arange(2, 2 + n) % 60 for n in (9, 4, 13, 6)]
    packed = packed_logits(model, prompts, prefixes=[0, 0, 5, 3])
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            torch.testing.assert_close(packed[i], model(input_ids=ids.unsqueeze(0)).logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ZOO if a.task_type == "CAUSAL_LM"], ids=lambda a: a.name)
def test_every_zoo_decoder_the_slot_cache_fits_takes_packed_prefill(arch):
    model = arch.build()
    use_grouped_attention(model)
    if not slot_cache_fits(model, 32):
        pytest.skip(f"{arch.name} is served with static batching (no slot cache, so no packed prefill)")
    assert use_packed_prefill(model)[0]
    prompts = [torch.arange(2, 2 + n) % 60 for n in (9, 4, 13, 6)]
    packed = packed_logits(model, prompts, prefixes=[0, 0, 5, 3])
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            torch.testing.assert_close(packed[i], model(input_ids=ids.unsqueeze(0)).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_a_model_whose_packed_forward_differs_keeps_padded_prefill(monkeypatch):
    model = tiny_llama()
    use_grouped_attention(model)
    before = model.config._attn_implementation
    # a plan that forgets the cached prefix: the probe's second prompt comes out wrong
    monkeypatch.setattr(PackedPlan, "_mask", lambda self, start, length, device: torch.ones(
        length, start + length, dtype=torch.bool).tril(0))
    on, note = use_packed_prefill(model)
    assert not on and "differs" in note
    assert model.config._attn_implementation == before


def test_packed_prefill_is_off_when_asked_or_without_sdpa():
    model = tiny_llama()
    assert use_packed_prefill(model, "off") == (False, "off (--packed-prefill off)")
    model.set_attn_implementation("eager")
    on, note = use_packed_prefill(model)
    assert not on and "'eager'" in note and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_packed_and_padded_engines_answer_as_offline_generate(causal_dir, adapter_dir, monkeypatch, setting):
    forwards = []
    packed = continuous.ContinuousBatcher._forward_packed

    def counted(self, adapter, first_slot, fed, starts):
        forwards.append((adapter, [len(f) for f in fed], list(starts)))
        return packed(self, adapter, first_slot, fed, starts)
    monkeypatch.setattr(continuous.ContinuousBatcher, "_forward_packed", counted)
    engine = make_engine(causal_dir, adapter_dir, packed_prefill=setting)
    try:
        assert engine.packed_prefill == (setting == "auto")
        # different lengths, three adapters in one turn; the second round starts after the
        # prefix cache's blocks of the first (a packed prompt with a prefix already in its slot)
        jobs = [("alpha", SHARED + "a", 6), ("base", "a movie is very", 5), ("beta", "the plot", 6),
                ("alpha", "the actor is quite lovely and the film", 6), ("base", SHARED, 4)]
        for round_ in (jobs, [(a, SHARED + "so the film is", n) for a, _, n in jobs[:2]]):
            answers_as_offline(engine, causal_dir, adapter_dir, round_)
    finally:
        engine.close()
    if setting == "off":
        assert forwards == []
        return
    assert any(len(lengths) > 1 for _, lengths, _ in forwards), "several prompts went in one packed forward"
    assert any(start >= BLOCK for _, _, starts in forwards for start in starts), "a prompt followed a cached prefix"


def test_the_packed_mask_is_a_view_of_the_planned_shape():
    cache = SlotCache(tiny_llama().config, 2, torch.float32, torch.device("cpu"))
    plan = cache.plan_packed(0, [0, 3], [4, 2])
    mask = placeholder_mask(plan, torch.float32)
    assert mask.shape == (1, 1, 6, 5) and mask.untyped_storage().nbytes() == 4  # one number, broadcast
    assert plan.positions().tolist() == [0, 1, 2, 3, 3, 4] and plan.last_tokens().tolist() == [3, 5]


def test_a_turn_goes_in_one_packed_forward_per_adapter_in_order_of_arrival():
    newcomers = [SimpleNamespace(request=SimpleNamespace(adapter=name)) for name in ["b", "a", "b", "base", "a"]]
    groups = adapter_groups(newcomers)
    assert [[n.request.adapter for n in group] for group in groups] == [["b", "b"], ["a", "a"], ["base"]]
    assert [n for group in groups for n in group if n.request.adapter == "b"] == [newcomers[0], newcomers[2]]
