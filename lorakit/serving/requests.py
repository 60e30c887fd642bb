"""What a serving request is, the limits it must fit, and the error it gets when it does not."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LoraError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServingError(LoraError):
    """A request the engine refuses; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_batch: int = 16
    max_queue: int = 128
    max_body_bytes: int = 256_000
    batch_window_s: float = 0.01
    adapter_wait_s: float = 30.0  # how long a request for an adapter not in memory waits for an evictable one
    # KV cache allocated when the engine starts (it still grows past that on demand): first-touching
    # fresh memory costs about a second per GB here, which a request would otherwise wait through
    kv_cache_mb: float = 1024


@dataclass
class Request:
    kind: str                       # "generate" or "classify"
    adapter: str                    # an adapter name or BASE
    prompt_ids: list[int]
    sink: Callable[[str, object], None]  # sink("delta", text) / ("done", result) / ("error", ServingError)
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False        # vLLM's: decode max_new_tokens whatever is sampled (benchmarks)
    stream: bool = True             # send "delta" events as text is ready (False: only "done")
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False         # its client went away: the scheduler drops it at the next step

    def cancel(self) -> None:
        self.cancelled = True
