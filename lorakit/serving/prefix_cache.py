"""Prefix caching: the keys and values of prompt prefixes that requests share (a chat template's
system prompt, an instruction every request repeats), computed once and copied into the slot of
each later request that starts with them, as vLLM does by default.

Prompts are cut into blocks of ``BLOCK`` tokens; an entry holds one block's keys and values for
every layer and is found by its whole prefix up to the block's end, so a hit on block b means
blocks 0..b all match. Keys and values depend on the adapter (LoRA on q/k/v changes them), so the
adapter and the load it came from are part of the key: a reloaded adapter never meets the old one's
entries. The last prompt token is always computed (its logits give the first new token), so at most
len(prompt) - 1 tokens come from the cache. Least recently used entries go once ``max_bytes`` is
reached. Several serving workers share one cache, so every method holds its lock.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

import torch

BLOCK = 16  # tokens per entry: vLLM's block size; small enough to catch short shared prefixes


def _ends(prompt: list[int], end: int | None = None) -> range:
    """Where the whole blocks of ``prompt`` end, never the block holding its last token (its logits
    give the first new token), and none past ``end``."""
    last = len(prompt) - 1 if end is None else min(end, len(prompt) - 1)
    return range(BLOCK, last + 1, BLOCK)


def _key(owner: tuple, prompt: list[int], end: int) -> tuple:
    """The entry of the block ending at ``end``: its adapter load and the whole prefix up to there."""
    return owner, tuple(prompt[:end])


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.queried = 0  # prompt tokens looked up
        self.hit = 0      # of those, tokens taken from the cache
        self.lock = threading.Lock()

    def lookup(self, owner: tuple, prompt: list[int], end: int | None = None, count: bool = True) -> list[torch.Tensor]:
        """The cached blocks ``prompt`` starts with, in order (count their tokens with ``BLOCK``),
        up to ``end`` if given; ``count``: whether the lookup counts in the hit rate (a request's
        prompt does, the engine's own work on a shared prefix does not)."""
        with self.lock:
            blocks = []
            if self.max_bytes > 0:
                for stop in _ends(prompt, end):
                    key = _key(owner, prompt, stop)
                    if key not in self.entries:
                        break
                    self.entries.move_to_end(key)
                    blocks.append(self.entries[key])
            if count:
                self.queried += len(prompt)
                self.hit += len(blocks) * BLOCK
            return blocks

    def missing(self, owner: tuple, prompt: list[int], end: int | None = None) -> list[int]:
        """Where the blocks of ``prompt`` that are not cached yet start (only whole blocks that end
        before its last token, and by ``end`` if given)."""
        if self.max_bytes <= 0:
            return []
        with self.lock:
            return [stop - BLOCK for stop in _ends(prompt, end) if _key(owner, prompt, stop) not in self.entries]

    def shared_uncached(self, prompts: list[tuple[tuple, list[int]]]) -> list[tuple[int, int]]:
        """Leading whole blocks that two or more of these (owner, prompt) pairs share and the cache
        lacks: ``(i, end)`` for each, meaning prompt i's first ``end`` tokens. Computed once and
        cached before the prompts' own forward, each prompt then starts after them; otherwise a
        burst of requests computes its shared prefix (a chat template's system prompt) once per
        request in that forward, since nothing is cached until it ends. The longest such prefix of
        each prompt, none that another one returned already contains."""
        if self.max_bytes <= 0:
            return []
        sharing = Counter(_key(owner, prompt, stop) for owner, prompt in prompts for stop in _ends(prompt))
        longest: dict[tuple, tuple[int, int]] = {}
        for i, (owner, prompt) in enumerate(prompts):
            shared = 0
            for stop in _ends(prompt):
                if sharing[_key(owner, prompt, stop)] < 2:
                    break
                shared = stop
            if shared:
                longest.setdefault(_key(owner, prompt, shared), (i, shared))
        with self.lock:
            wanted = [key for key in longest if key not in self.entries]
        return [longest[key] for key in wanted
                if not any(other[0] == key[0] and len(other[1]) > len(key[1]) and other[1][:len(key[1])] == key[1]
                           for other in wanted)]

    def add(self, owner: tuple, prompt: list[int], start: int, block: torch.Tensor) -> None:
        with self.lock:
            self._add(_key(owner, prompt, start + BLOCK), block)

    def _add(self, key: tuple, block: torch.Tensor) -> None:
        if key in self.entries:
            return
        size = block.numel() * block.element_size()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = block
        self.bytes += size

    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0
