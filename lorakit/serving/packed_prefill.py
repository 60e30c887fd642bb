"""Packed prefill: several prompts in one forward as one row of their tokens laid end to end.

Right-padding prompts to the longest of their forward makes every GEMM of the forward compute the
padding too: 14.5% of the tokens fed on the serving anchor workload (64 chat prompts of 85-397
tokens, grouped so that padding stays under 15% a forward). Packed, a forward's input is one row:
the first prompt's new tokens, then the second's, ...; every linear layer sees real tokens only,
and the prompts of a turn need not be split by length. Attention is the one place where the prompts
must stay apart: during a packed forward, the slot cache writes each prompt's keys and values into
its own slot and the attention function (attention.grouped_sdpa) runs each prompt's queries over
its own slot's columns, its cached prefix included (slot_cache.PackedPlan). One row means one
adapter: a turn's newcomers go in one packed forward per adapter.

``use_packed_prefill`` proves it on the model first (a packed forward of two prompts, one after a
cached prefix, against each prompt's plain forward) and otherwise leaves the padded forwards.
"""

from __future__ import annotations

import contextlib

import torch

from .attention import NAME, proved_on_grouped_sdpa, set_packed_plan
from .checks import same_logits
from .slot_cache import PackedPlan, SlotCache, cache_keyword, slot_forward

SETTINGS = ("auto", "off")


@contextlib.contextmanager
def packing(plan: PackedPlan):
    """Run this thread's next forwards on ``plan`` (the slot cache it belongs to is planned already)."""
    set_packed_plan(plan)
    try:
        yield
    finally:
        set_packed_plan(None)


def placeholder_mask(plan: PackedPlan, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask a packed forward is given: 4-D, so that transformers takes it as it is
    instead of building one, and never read (each prompt's attention is the plan's). A
    broadcast view: no memory for tokens × columns."""
    return torch.zeros((1, 1, 1, 1), dtype=dtype, device=plan.cache.device).expand(
        1, 1, plan.tokens, plan.cache.get_seq_length())


def use_packed_prefill(model, setting: str = "auto") -> tuple[bool, str]:
    """Whether the engine's prefill forwards go packed on ``model``, and a line saying so. Needs
    the slot cache (the caller has checked it fits) and transformers' SDPA attention."""
    if setting == "off":
        return False, "off (--packed-prefill off)"
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME):
        return False, f"off (the model runs {current!r} attention; packed prefill needs sdpa)"
    if not proved_on_grouped_sdpa(model, _packed_equals_plain, "packed prefill", "prompts are padded"):
        return False, "off (this model's packed forward differs from its plain one; prompts are padded)"
    return True, "on (prompts of one forward laid end to end, no padding; --packed-prefill off)"


def _packed_equals_plain(model) -> bool:
    """Two prompts of different lengths in one packed forward, the second after a 2-token prefix
    already in its slot: each one's last logits equal its own plain forward's."""
    reference = next(model.parameters())
    vocab = model.config.get_text_config().vocab_size
    first, second = torch.arange(1, 8) % vocab, torch.arange(11, 16) % vocab
    keyword = cache_keyword(model)
    with torch.inference_mode():
        plain = [model(input_ids=ids.unsqueeze(0).to(reference.device)).logits[0, -1] for ids in (first, second)]
        cache = SlotCache(model.config, 2, reference.dtype, reference.device)
        slot_forward(model, cache, 1, second[:2])
        plan = cache.plan_packed(0, [0, 2], [len(first), len(second) - 2])
        with packing(plan):
            out = model(input_ids=torch.cat([first, second[2:]]).unsqueeze(0).to(reference.device),
                        attention_mask=placeholder_mask(plan, reference.dtype),
                        position_ids=plan.positions().unsqueeze(0).to(reference.device), use_cache=True,
                        logits_to_keep=plan.last_tokens().to(reference.device), **{keyword: cache})
    packed = out.logits[0]
    return all(same_logits(packed[i], plain[i], reference.dtype) for i in range(2))
