"""Batched decoding for the server: left-padded prompts, one adapter per row, a KV cache, and
per-row sampling, stop strings and lengths."""

from __future__ import annotations

import contextlib

import torch

import lorakit as lk

from ..model.state import BASE
from .slot_cache import cache_keyword, returned_cache


def _adapter_block(engine, names: list[str]):
    if all(n == BASE for n in names):  # nothing to mix (possibly no adapter loaded at all)
        if engine.has_adapters():
            return lk.disable_adapters(engine.model)
        return contextlib.nullcontext()
    return lk.mixed_batch(engine.model, engine.pool.model_names(names))


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask; decoders pad on the left (every row ends at the last position),
    encoders on the right (positions start at 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def _pick(logits: torch.Tensor, request, generator) -> int:
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < request.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """One request's decoding state: its tokens, the text streamed so far, and when it ends."""

    def __init__(self, request, tokenizer, eos_ids: set[int], on_token=lambda request: None):
        self.request, self.tokenizer, self.eos_ids, self.on_token = request, tokenizer, eos_ids, on_token
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.stop_token: int | None = None  # the end-of-sequence token that ended it, if one did
        self.generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # chars that may start a stop string

    def add(self, token: int) -> None:
        self.on_token(self.request)
        if token in self.eos_ids and not self.request.ignore_eos:
            self.finish, self.stop_token = "stop", token
            return
        self.tokens.append(token)
        # the text so far, only where something reads it: stop strings, or a client streaming it
        wanted = self.request.stop or self.request.stream
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True) if wanted else ""
        if any(stop and stop in text for stop in self.request.stop):
            self.finish = "stop"
            return
        if len(self.tokens) >= self.request.max_new_tokens:
            self.finish = "length"
            return
        if not self.request.stream:
            return
        # stream what can no longer become part of a stop string (or a half-decoded character)
        ready = len(text) - self.hold if self.request.stop else len(text)
        if text.endswith("\ufffd"):
            ready = min(ready, len(text) - 1)
        if ready > self.sent:
            self.request.sink("delta", text[self.sent:ready])
            self.sent = ready

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.request.stop if s and s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def close(self) -> None:
        text = self.text()
        if len(text) > self.sent and self.request.stream:
            self.request.sink("delta", text[self.sent:])
        self.request.sink("done", {"text": text, "finish_reason": self.finish or "length",
                                   "completion_tokens": len(self.tokens), "prompt_tokens": len(self.request.prompt_ids),
                                   # what was sampled, the end-of-sequence token included (RL trains on it)
                                   "token_ids": self.tokens + ([self.stop_token] if self.stop_token is not None else [])})


def _eos_ids(engine) -> set[int]:
    config = getattr(engine.model, "generation_config", None)  # classifiers have none
    ids = config.eos_token_id if config else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, engine.tokenizer.eos_token_id] if i is not None}


def generate_batch(engine, requests) -> None:
    model, tokenizer = engine.model, engine.tokenizer
    eos_ids = _eos_ids(engine)
    rows = [_Row(r, tokenizer, eos_ids, engine.counters.prometheus.token) for r in requests]
    ids, mask = _pad([r.prompt_ids for r in requests], tokenizer.pad_token_id or 0, left=True)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    device = next(model.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    keyword = cache_keyword(model)
    with _adapter_block(engine, [r.adapter for r in requests]):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        steps = max(r.max_new_tokens for r in requests)
        for _ in range(steps):
            logits = out.logits[:, -1]
            next_ids = []
            for row in rows:
                if row.finish is None and row.request.cancelled:  # its client went away: stop its row now
                    row.finish = "cancelled"
                    engine.counters.cancelled()
            for i, row in enumerate(rows):
                token = _pick(logits[i], row.request, row.generator) if row.finish is None else tokenizer.pad_token_id or 0
                if row.finish is None:
                    row.add(token)
                next_ids.append(token)
            if all(row.finish for row in rows):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=torch.tensor(next_ids, device=device).unsqueeze(1), attention_mask=mask,
                        position_ids=positions, use_cache=True,
                        **{keyword: returned_cache(out, keyword)})
    for row in rows:
        engine.counters.prompt(len(row.request.prompt_ids))
        engine.counters.completion(len(row.tokens))
        if row.finish != "cancelled":  # nobody is there to answer
            row.close()


def classify_batch(engine, requests) -> None:
    model, tokenizer = engine.model, engine.tokenizer
    ids, mask = _pad([r.prompt_ids for r in requests], tokenizer.pad_token_id or 0,
                     left=tokenizer.padding_side == "left")
    with _adapter_block(engine, [r.adapter for r in requests]):
        probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
    labels = engine.labels or [str(i) for i in range(probs.shape[-1])]
    for request, row in zip(requests, probs):
        engine.counters.prompt(len(request.prompt_ids))
        request.sink("done", {"label": labels[int(row.argmax())],
                              "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row)}})
