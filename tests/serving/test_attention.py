"""The server's grouped-query attention: the same logits as transformers' SDPA through the slot
cache's masked forwards, and transformers' own attention kept when it cannot be used."""

import torch

from lorakit.serving.attention import NAME, grouped_sdpa, use_grouped_attention
from lorakit.serving.slot_cache import SlotCache, cache_keyword
from tests.helpers import tiny_bert, tiny_llama


def _slot_forward(model, ids):
    """Two rows fed in two chunks through a SlotCache (the 4-D mask the server passes)."""
    cache = SlotCache(model.config, 2, torch.float32, torch.device("cpu"))
    outs = []
    with torch.inference_mode():
        for start, stop in ((0, 4), (4, 7)):
            mask = cache.plan(slice(0, 2), torch.tensor([start, start]), stop - start)
            outs.append(model(input_ids=ids[:, start:stop], attention_mask=mask, use_cache=True,
                              position_ids=torch.arange(start, stop).repeat(2, 1),
                              **{cache_keyword(model): cache}).logits)
    return torch.cat(outs, dim=1)


def test_grouped_attention_gives_sdpa_logits_through_the_slot_cache():
    model, ids = tiny_llama(), torch.randint(2, 90, (2, 7))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    expected = _slot_forward(model, ids)
    assert use_grouped_attention(model) and model.config._attn_implementation == NAME
    torch.testing.assert_close(_slot_forward(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_transformers_attention_is_kept_when_the_grouped_one_fails(monkeypatch, caplog):
    model = tiny_llama()
    monkeypatch.setattr("lorakit.serving.attention.F.scaled_dot_product_attention",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel")))
    assert not use_grouped_attention(model)
    assert model.config._attn_implementation == "sdpa" and "no kernel" in caplog.text


def test_wrong_grouped_results_are_caught_and_models_without_groups_stay():
    model = tiny_llama()
    import lorakit.serving.attention as attention

    def wrong(module, query, key, value, attention_mask, **kwargs):
        out, _ = grouped_sdpa(module, query, key, value, attention_mask, **kwargs)
        return out * 1.5, None

    original = attention.grouped_sdpa
    attention.grouped_sdpa = wrong
    try:
        assert not use_grouped_attention(model)
    finally:
        attention.grouped_sdpa = original
    assert model.config._attn_implementation == "sdpa"
    assert not use_grouped_attention(tiny_bert())  # no grouped KV heads: nothing to gain
