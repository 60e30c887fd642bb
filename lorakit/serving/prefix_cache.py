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
from collections import OrderedDict

import torch

BLOCK = 16  # tokens per entry: vLLM's block size; small enough to catch short shared prefixes


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

    def lookup(self, owner: tuple, prompt: list[int]) -> list[torch.Tensor]:
        """The cached blocks ``prompt`` starts with, in order (count their tokens with ``BLOCK``)."""
        with self.lock:
            return self._lookup(owner, prompt)

    def _lookup(self, owner: tuple, prompt: list[int]) -> list[torch.Tensor]:
        blocks = []
        if self.max_bytes > 0:
            for end in range(BLOCK, len(prompt), BLOCK):  # never the block holding the last token
                key = _key(owner, prompt, end)
                if key not in self.entries:
                    break
                self.entries.move_to_end(key)
                blocks.append(self.entries[key])
        self.queried += len(prompt)
        self.hit += len(blocks) * BLOCK
        return blocks

    def missing(self, owner: tuple, prompt: list[int]) -> list[int]:
        """Where the blocks of ``prompt`` that are not cached yet start (only whole blocks that end
        before its last token)."""
        if self.max_bytes <= 0:
            return []
        with self.lock:
            return [end - BLOCK for end in range(BLOCK, len(prompt), BLOCK)
                    if _key(owner, prompt, end) not in self.entries]

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
