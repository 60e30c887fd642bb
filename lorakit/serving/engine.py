"""The serving engine: one base model, many adapters, requests batched across adapters.

The engine owns the request queue, the worker thread that runs a scheduler, and the counters; the
adapters in memory belong to its ``pool`` (pool.py). Every row of a batch uses its own adapter
through ``lk.mixed_batch`` and stops on its own (EOS, stop string, max_tokens). Two schedulers:
  continuous (default) - requests join the running batch at the next decoding step and leave when
      they finish; prompts are prefilled in chunks between steps (continuous.py);
  static - whatever arrived within a short window, up to max_batch, runs together until its last
      row finishes (static.py); kept for comparison and for models the slot cache does not fit.

With ``workers`` > 1 (continuous scheduling only) that many worker threads each run their own
continuous batcher over the one model, with a share of ``max_batch`` slots and of the KV cache, one
prefix cache between them and ``torch`` threads split between them: on this 2-core machine two
one-thread workers decode 1.6x as many tokens per second as one two-thread worker, whose second
core idles through the per-op Python and small ops (BENCHMARKS.md, issue 26). Forwards share the
model lock; adapter loads take it alone (locks.py).

What a scheduler may use of the engine (and nothing else): ``model``, ``tokenizer``, ``labels``,
``limits``, ``model_lock``, ``running``, ``counters``, ``workers``, ``prefix_cache``,
``has_adapters()``, ``take(block)``, ``finish(request)``, ``run_batch(...)``,
``report_waiting(count)`` and ``adapter_version(name)``. The HTTP layer (app.py) only validates and
hands requests over.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from ..kernels.packed_linear import unpack_linears
from .attention import use_grouped_attention
from .continuous import ContinuousBatcher
from .decode_kernel import SETTINGS as DECODE_KERNEL_SETTINGS, use_decode_kernel
from .lora_kernel import SETTINGS as LORA_KERNEL_SETTINGS, use_lora_kernel
from .locks import ModelLock
from .metrics import Counters
from .openmp import release_threads
from .packed_prefill import SETTINGS as PACKED_PREFILL_SETTINGS, use_packed_prefill
from .packed_weights import SETTINGS as PACKED_SETTINGS, use_packed_weights
from .pool import AdapterPool
from .prefix_cache import PrefixCache
from .requests import Limits, Request, ServingError
from .slot_cache import slot_cache_fits
from .static import StaticBatcher

log = logging.getLogger("lorakit.serve")

__all__ = ["Engine", "Limits", "Request", "ServingError"]


class Engine:
    def __init__(self, model, tokenizer, *, base_name: str = "base", adapter_dir: str | None = None,
                 labels: list[str] | None = None, limits: Limits = Limits(), max_loaded_adapters: int | None = None,
                 scheduler: str = "continuous", prefill_chunk: int = 256, prefix_cache_mb: float = 256,
                 workers: int = 1, packed_weights: str = "auto", packed_prefill: str = "auto",
                 decode_kernel: str = "auto", lora_kernel: str = "auto"):
        if scheduler not in ("continuous", "static"):
            raise ServingError(f"unknown scheduler {scheduler!r}; choose continuous or static")
        if prefill_chunk < 1:
            raise ServingError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        if workers < 1 or (workers > 1 and scheduler != "continuous"):
            raise ServingError(f"workers must be 1 or more (more than 1 only with continuous scheduling), got {workers}")
        if workers > limits.max_batch:
            raise ServingError(f"{workers} workers need max_batch of at least {workers}, got {limits.max_batch}")
        if packed_weights not in PACKED_SETTINGS:
            raise ServingError(f"packed_weights must be one of {', '.join(PACKED_SETTINGS)}, got {packed_weights!r}")
        if packed_prefill not in PACKED_PREFILL_SETTINGS:
            raise ServingError(f"packed_prefill must be one of {', '.join(PACKED_PREFILL_SETTINGS)}, "
                               f"got {packed_prefill!r}")
        if decode_kernel not in DECODE_KERNEL_SETTINGS:
            raise ServingError(f"decode_kernel must be one of {', '.join(DECODE_KERNEL_SETTINGS)}, "
                               f"got {decode_kernel!r}")
        if lora_kernel not in LORA_KERNEL_SETTINGS:
            raise ServingError(f"lora_kernel must be one of {', '.join(LORA_KERNEL_SETTINGS)}, got {lora_kernel!r}")
        self.model, self.tokenizer, self.base_name, self.labels, self.limits = model.eval(), tokenizer, base_name, labels, limits
        if prefix_cache_mb < 0:
            raise ServingError(f"prefix_cache_mb must be 0 (off) or more, got {prefix_cache_mb}")
        self.scheduler, self.prefill_chunk, self.prefix_cache_mb = scheduler, prefill_chunk, prefix_cache_mb
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.model_lock = ModelLock()  # shared by forwards, exclusive while adapters change
        self.workers = workers
        self.threads = torch.get_num_threads()  # the process's torch threads, split between busy workers
        self.threads_per_worker = max(1, self.threads // workers)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self.batchers: list[ContinuousBatcher] = []  # the workers' schedulers, once they start
        self.pool = AdapterPool(self.model, self.model_lock, base_name=base_name, adapter_dir=adapter_dir,
                                max_loaded=max_loaded_adapters, wait_s=limits.adapter_wait_s)
        self._waiting_elsewhere: list[Callable[[], int]] = []  # taken off the queue by schedulers, not started
        self.counters = Counters(waiting=self.waiting, loaded_adapters=lambda: len(self.adapters))
        self.stats, self.prometheus = self.counters.stats, self.counters.prometheus
        # before the worker starts, so nothing runs on the model meanwhile (packed_weights.py)
        self.packed_weights, self.packed_weights_note = use_packed_weights(self.model, packed_weights,
                                                                           self.threads_per_worker)
        self.packed_prefill, self.packed_prefill_note = False, "off (static batching pads its prompts)"
        self.decode_kernel, self.decode_kernel_note = None, "SDPA (static batching)"
        self.lora_kernel, self.lora_kernel_note = None, "torch's GEMMs (static batching)"
        if scheduler == "continuous":
            self._check_continuous(packed_prefill, decode_kernel, lora_kernel)
        self.running = True
        # the caller's OpenMP team (built while it loaded the model) would keep the workers' teams
        # from spinning between operations: free it (serving/openmp.py)
        release_threads()
        self.worker = threading.Thread(target=self._work, name="lorakit-engine", daemon=True)
        self.worker.start()

    @property
    def adapters(self) -> list[str]:
        """The adapters requests may use now (the pool's)."""
        return self.pool.adapters

    def has_adapters(self) -> bool:
        return bool(self.pool.adapters)

    def adapter_version(self, name: str) -> tuple:
        """``name`` and which load of it is resident: cached keys and values belong to one load."""
        return name, self.pool.loads.get(name, 0)

    def check_model(self, name: str, load: bool = True) -> str:
        """The adapter a request for model ``name`` runs with, loaded if need be (AdapterPool.resolve).
        load=False only checks the name: the HTTP endpoints leave the load to ``submit``, which
        counts the request against the adapter in the same step, so no other request evicts it
        in between."""
        return self.pool.resolve(name) if load else self.pool.check(name)

    # --- requests ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._admit(request)
        self.queue.put(request)

    def submit_all(self, requests: list[Request]) -> None:
        """Queue several requests at once: the scheduler sees all of them on its next look, so the
        batches they form (and hence sampled tokens) do not depend on thread timing (rollouts for
        training want that)."""
        for request in requests:
            self._admit(request)
        with self.queue.mutex:
            self.queue.queue.extend(requests)
            self.queue.unfinished_tasks += len(requests)
            self.queue.not_empty.notify(len(requests))  # every idle worker may take a share

    def _admit(self, request: Request) -> None:
        if not self.running:
            raise ServingError("the server is shutting down", 503)
        if self.waiting() >= self.limits.max_queue:
            raise ServingError(f"the queue is full ({self.limits.max_queue} requests waiting); retry later", 429)
        if len(request.prompt_ids) > self.limits.max_prompt_tokens:
            raise ServingError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is "
                               f"{self.limits.max_prompt_tokens}")
        if request.kind == "generate" and not 1 <= request.max_new_tokens <= self.limits.max_new_tokens:
            raise ServingError(f"max_tokens must be between 1 and {self.limits.max_new_tokens}")
        self.pool.acquire(request.adapter)
        self.counters.accepted(request)

    def waiting(self) -> int:
        """Requests accepted but not started yet (those waiting for room for their adapter included)."""
        return self.queue.qsize() + sum(count() for count in self._waiting_elsewhere) + len(self.pool.line)

    def metrics(self) -> dict:
        return self.counters.summary(self.waiting(), len(self.adapters))

    def close(self) -> None:
        self.running = False
        self.queue.put(None)  # wakes the worker
        self.worker.join(timeout=10)
        if self.packed_weights:  # the model goes back as it came (its packed copies freed)
            with self.model_lock:
                unpack_linears(self.model)
            self.packed_weights = False

    # --- what schedulers use -------------------------------------------------------------------
    def take(self, block: bool, timeout: float | None = None) -> Request | None:
        """The next queued request; None once the engine closes. Raises queue.Empty when there is
        none (at once when not ``block``, after ``timeout`` otherwise)."""
        item = self.queue.get(timeout=timeout) if block else self.queue.get_nowait()
        if item is None:
            self.queue.put(None)  # keep the close visible to the next take
        return item

    def report_waiting(self, count: Callable[[], int]) -> None:
        """A scheduler holding requests it has not started tells the queue limit about them."""
        self._waiting_elsewhere.append(count)

    def finish(self, request: Request) -> None:
        """The request is answered (or failed, or cancelled): its adapter may go."""
        self.pool.release(request.adapter)
        self.counters.finished(request)

    def run_batch(self, run, requests: list, what: str) -> None:
        """``run(self, requests)`` under the model lock; a failure fails these requests with a 500,
        never the server; they are finished either way."""
        try:
            with self.model_lock.shared(), torch.inference_mode():
                run(self, requests)
        except Exception as exc:
            self.counters.failed(len(requests), 500)
            for request in requests:
                request.sink("error", ServingError(f"{what} failed: {exc}", 500))
        finally:
            for request in requests:
                self.finish(request)

    # --- the worker ----------------------------------------------------------------------------
    def _check_continuous(self, packed_prefill: str, decode_kernel: str, lora_kernel: str) -> None:
        """Which of the continuous scheduler's speed-ups this model takes, each proved by a forward
        (the slot cache itself, or static batching when it does not fit); before the worker starts."""
        use_grouped_attention(self.model)  # the slot cache's masked forwards, without repeat_kv
        fits = self.labels is not None or slot_cache_fits(
            self.model, self.limits.max_prompt_tokens + self.limits.max_new_tokens)
        if not fits:
            log.warning("this model's attention does not take the slot cache; serving with static batching")
            self.scheduler = "static"
        elif self.labels is not None:
            self.packed_prefill_note = "off (a classifier generates nothing to prefill)"
            self.decode_kernel_note = "SDPA (a classifier decodes nothing)"
            self.lora_kernel_note = "torch's GEMMs (a classifier decodes nothing)"
        else:
            self.packed_prefill, self.packed_prefill_note = use_packed_prefill(self.model, packed_prefill)
            self.decode_kernel, self.decode_kernel_note = use_decode_kernel(self.model, decode_kernel)
            self.lora_kernel, self.lora_kernel_note = use_lora_kernel(self.model, lora_kernel)

    def _work(self) -> None:
        if self.scheduler == "continuous":
            self.batchers = batchers = [ContinuousBatcher(self, self.prefill_chunk, worker=i)
                                        for i in range(self.workers)]
            others = [threading.Thread(target=self._run_worker, args=(b,), name=f"lorakit-engine-{i}", daemon=True)
                      for i, b in enumerate(batchers[1:], start=1)]
            for thread in others:
                thread.start()
            self._run_worker(batchers[0])
            for thread in others:
                thread.join()
            return
        StaticBatcher(self).run()

    def _run_worker(self, batcher: ContinuousBatcher) -> None:
        batcher.run()

    def threads_for(self, batcher: ContinuousBatcher) -> int | None:
        """torch threads for ``batcher``'s next forward (None: leave them, one worker): its share of
        the cores while another worker holds requests, all of them while it works alone (a lone
        request's prefill, and so its time to first token, is as fast as with one worker)."""
        if self.workers == 1:
            return None
        if all(other is batcher or not other.load() for other in self.batchers):
            return self.threads
        return self.threads_per_worker
