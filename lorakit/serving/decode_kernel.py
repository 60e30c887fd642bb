"""Decoding steps' attention through lorakit's kernel (kernels/decode_attention.py) on a CPU model.

A decoding step gives every running row one query token over its own cached columns. Through SDPA
that is a padded 4-D mask: each row is read up to the widest row's width by a flash kernel made for
long queries. While a worker's forward has a decode plan active (``decoding``), the attention
function (attention.grouped_sdpa) hands one-token queries to the kernel with each row's length
instead. The plan is only set where the kernel measured faster: an fp32 or bf16 CPU model and a
forward on at most ``MAX_THREADS`` threads (the server's two workers run one thread each).

``use_decode_kernel`` builds the kernel (about a second, once per machine; cached beside the
converted models) and proves it on the model first: a decoding step of two rows of different
lengths through the kernel must give SDPA's logits, or the engine keeps SDPA and says why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..hub.models import cache_dir
from ..kernels import native
from ..kernels.decode_attention import MAX_THREADS, DecodeAttention, load
from .attention import EXTRAS, NAME, proved_on_grouped_sdpa, set_decode_plan
from .checks import same_logits
from .slot_cache import SlotCache, cache_keyword, slot_forward

log = logging.getLogger("lorakit.serving")
SETTINGS = ("auto", "off")


@dataclass
class DecodePlan:
    """One forward's decoding: the kernel and each row's number of columns (its position + 1)."""

    kernel: DecodeAttention
    lengths: torch.Tensor
    longest: int = field(init=False)

    def __post_init__(self):
        if self.lengths.dtype != torch.int64 or not self.lengths.is_contiguous():
            self.lengths = self.lengths.to(torch.int64).contiguous()
        self.longest = int(self.lengths.max())

    def takes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, extras: dict) -> bool:
        return (not any(extras.get(name) is not None for name in EXTRAS) and not extras.get("output_attentions")
                and self.kernel.supports(query, key, value))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling) -> torch.Tensor:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return self.kernel.attend(query, key, value, self.lengths, self.longest, scale)


@contextlib.contextmanager
def decoding(kernel: DecodeAttention | None, positions: torch.Tensor):
    """Run this thread's next forward's one-token attention through ``kernel``, row r over its
    columns 0..positions[r]; a no-op without a kernel or on more than MAX_THREADS threads (checked
    when entered, after the worker has set its threads)."""
    if kernel is None or torch.get_num_threads() > MAX_THREADS:
        yield
        return
    set_decode_plan(DecodePlan(kernel, positions + 1))
    try:
        yield
    finally:
        set_decode_plan(None)


def use_decode_kernel(model, setting: str = "auto") -> tuple[DecodeAttention | None, str]:
    """The kernel the engine's decoding steps use on ``model`` (None: SDPA), and a line saying so.
    Needs the slot cache (the caller has checked it fits) and transformers' SDPA attention."""
    if setting == "off":
        return None, "SDPA (--decode-kernel off)"
    refused = native.refusal(model)
    if refused:
        return None, f"SDPA ({refused})"
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME):
        return None, f"SDPA (the model runs {current!r} attention)"
    kernel, how = load(str(cache_dir() / "kernels"))
    if kernel is None:
        log.warning("the decoding kernel is not usable here: %s; decoding steps use SDPA", how)
        return None, f"SDPA (the kernel: {how})"
    if not proved_on_grouped_sdpa(model, lambda m: _kernel_equals_sdpa(m, kernel), "the decoding kernel",
                                  "decoding steps use SDPA"):
        return None, "SDPA (this model's decoding step through the kernel differs from SDPA's)"
    note = "" if kernel.vectorised else ", not vectorised on this CPU"
    return kernel, (f"lorakit's kernel, each row over its own columns (forwards on up to {MAX_THREADS} "
                    f"threads{note}; --decode-kernel off for SDPA)")


def _kernel_equals_sdpa(model, kernel: DecodeAttention) -> bool:
    """Two rows of different lengths in the slot cache, one decoding step: the kernel's logits
    equal SDPA's over the padded mask."""
    reference = next(model.parameters())
    vocab = model.config.get_text_config().vocab_size
    prompts = [torch.arange(1, 8) % vocab, torch.arange(11, 15) % vocab]
    keyword = cache_keyword(model)
    cache = SlotCache(model.config, len(prompts), reference.dtype, reference.device)
    with torch.inference_mode():
        for slot, ids in enumerate(prompts):
            slot_forward(model, cache, slot, ids)
        starts = torch.tensor([len(ids) for ids in prompts])
        step = {"input_ids": torch.tensor([[5], [9]], device=reference.device), "use_cache": True,
                "position_ids": starts.unsqueeze(1).to(reference.device), keyword: cache}
        # the same step twice writes the same keys and values at the same columns
        plain = model(attention_mask=cache.plan(slice(0, 2), starts, 1), **step).logits[:, -1]
        set_decode_plan(DecodePlan(kernel, starts + 1))
        try:
            through_kernel = model(attention_mask=cache.plan(slice(0, 2), starts, 1), **step).logits[:, -1]
        finally:
            set_decode_plan(None)
    return same_logits(through_kernel, plain, reference.dtype)
