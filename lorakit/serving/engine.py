"""The serving engine: one base model, many adapters, requests batched across adapters.

A worker thread runs the requests; every row uses its own adapter through ``lk.mixed_batch`` and
stops on its own (EOS, stop string, max_tokens). Two schedulers:
  continuous (default) - requests join the running batch at the next decoding step and leave when
      they finish; prompts are prefilled in chunks between steps (continuous.py);
  static - whatever arrived within a short window, up to max_batch, runs together until its last
      row finishes (decoding.generate_batch); kept for comparison and for models the slot cache
      does not fit.
The HTTP layer (app.py) only validates and hands requests over.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path

import torch

import lorakit as lk

from ..errors import LoraError
from ..model.state import BASE
from .continuous import ContinuousBatcher
from .decoding import classify_batch, generate_batch
from .metrics import ServerMetrics
from .requests import ADAPTER_NAME, Limits, Request, ServingError
from .slot_cache import slot_cache_fits

log = logging.getLogger("lorakit.serve")

__all__ = ["Engine", "Limits", "Request", "ServingError"]

class Engine:
    def __init__(self, model, tokenizer, *, base_name: str = "base", adapter_dir: str | None = None,
                 labels: list[str] | None = None, limits: Limits = Limits(), max_loaded_adapters: int | None = None,
                 scheduler: str = "continuous", prefill_chunk: int = 256):
        if scheduler not in ("continuous", "static"):
            raise ServingError(f"unknown scheduler {scheduler!r}; choose continuous or static")
        if prefill_chunk < 1:
            raise ServingError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.model, self.tokenizer, self.base_name, self.labels, self.limits = model.eval(), tokenizer, base_name, labels, limits
        self.scheduler, self.prefill_chunk = scheduler, prefill_chunk
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.queue: queue.Queue[Request] = queue.Queue()
        self.model_lock = threading.Lock()       # held while a batch runs and while adapters change
        self.in_use: dict[str, int] = {}
        self.draining: set[str] = set()
        self.idle = threading.Condition()
        self.max_loaded_adapters = max_loaded_adapters
        self.last_used: dict[str, float] = {}
        self.sources: dict[str, Path] = {}  # adapters given at start: reloaded from here after an eviction
        self.loading = threading.RLock()  # one on-demand load (and eviction) at a time
        self.adapter_line: deque[object] = deque()  # requests waiting for room to load their adapter
        self.stats = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "batches": 0,
                      "batched_rows": 0, "cancelled": 0}
        self.latencies: deque[float] = deque(maxlen=2000)
        self.waiting_elsewhere = lambda: 0  # requests a scheduler took off the queue but has not started
        self.prometheus = ServerMetrics(waiting=self.waiting, loaded_adapters=lambda: len(self.adapters))
        self.running = True
        self.worker = threading.Thread(target=self._work, name="lorakit-engine", daemon=True)
        self.worker.start()

    # --- adapters ------------------------------------------------------------------------------
    # Residency: at most --max-loaded-adapters adapters are in memory, whichever path loads them (a
    # request naming one, POST /v1/adapters, vLLM's /v1/load_lora_adapter). Adapters given at start
    # are reloadable, not pinned: they are evicted like the others and come back from their path when
    # a request names them again, so the cap holds exactly and no name ever becomes unknown.
    @property
    def adapters(self) -> list[str]:
        """The adapters requests may use: resident and not being unloaded."""
        return [n for n in self._resident() if n not in self.draining]

    def _resident(self) -> list[str]:
        """Every adapter in memory, those being unloaded included (they still take room)."""
        try:
            return lk.list_adapters(self.model)
        except LoraError:
            return []

    def known(self, name: str) -> bool:
        """Can ``name`` be loaded by name: given at start, or an adapter of --adapter-dir?"""
        if name in self.sources:
            return True
        try:
            self.resolve_adapter_path(name)
        except ServingError:
            return False
        return True

    def resolve_adapter_path(self, name: str) -> Path:
        """An adapter given at start, or a directory strictly inside the configured adapter dir (no
        paths, no `..`, no symlinks pointing out)."""
        if name in self.sources:
            return self.sources[name]
        if self.adapter_dir is None:
            raise ServingError("this server has no --adapter-dir; adapters cannot be loaded at run time", 403)
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise ServingError(f"invalid adapter name {name!r}: use letters, digits, '_', '-', '.' (no paths)")
        path = (self.adapter_dir / name).resolve()
        if path.parent != self.adapter_dir:
            raise ServingError(f"adapter {name!r} resolves outside the adapter directory; refused", 403)
        if not (path / "adapter_config.json").is_file():
            raise ServingError(f"no adapter named {name!r} in the adapter directory", 404)
        return path

    def add_start_adapter(self, name: str, path: str | Path) -> None:
        """An adapter named at start (--adapter NAME=PATH): loaded now, and reloadable after eviction."""
        if not ADAPTER_NAME.match(name) or name in (BASE, self.base_name):
            raise ServingError(f"invalid adapter name {name!r}")
        if self.max_loaded_adapters and len(self.sources) >= self.max_loaded_adapters:
            raise ServingError(f"{len(self.sources) + 1} adapters given at start but --max-loaded-adapters is "
                               f"{self.max_loaded_adapters}; raise the cap or give fewer --adapter")
        self._load(name, Path(path))
        self.sources[name] = Path(path)

    def _load(self, name: str, path: Path) -> None:
        with self.model_lock:
            try:
                lk.load_adapter(self.model, path, adapter_name=name)
            except LoraError as exc:
                raise ServingError(f"adapter {name!r} cannot be loaded: {exc}", 422) from None
        self.last_used[name] = time.monotonic()  # just loaded counts as just used: not the next to go

    def load_adapter(self, name: str) -> None:
        """POST /v1/adapters: load ``name`` by name, within the cap like any on-demand load."""
        if not ADAPTER_NAME.match(name) or name in (BASE, self.base_name):
            raise ServingError(f"invalid adapter name {name!r}")
        if name in self.adapters:
            raise ServingError(f"adapter {name!r} is already loaded", 409)
        self.resolve_adapter_path(name)  # 403 / 404 before waiting for anything
        self._load_on_demand(name)

    def unload_adapter(self, name: str, timeout: float = 60.0, forget: bool = False) -> None:
        """Stop accepting requests for ``name``, wait for its running ones, then drop it. forget=True
        (DELETE /v1/adapters/NAME) also drops a start adapter's path, so it is not reloaded by name."""
        with self.idle:
            if name not in self.adapters:
                raise ServingError(f"unknown adapter {name!r}", 404)
            self.draining.add(name)
        try:
            with self.idle:
                if not self.idle.wait_for(lambda: self.in_use.get(name, 0) == 0, timeout=timeout):
                    raise ServingError(f"adapter {name!r} is still busy after {timeout:.0f} s; try again", 503)
            with self.model_lock:
                lk.delete_adapter(self.model, name)
            self.last_used.pop(name, None)
            if forget:
                self.sources.pop(name, None)
        finally:
            with self.idle:
                self.draining.discard(name)
                self.idle.notify_all()

    # --- requests ------------------------------------------------------------------------------
    def check_model(self, name: str) -> str:
        """The adapter a request names: loaded already, or loaded now (given at start, or from
        --adapter-dir), evicting the least recently used idle adapter when the cap is reached."""
        if name in (self.base_name, BASE):
            return BASE
        if name not in self.adapters and self.known(name):
            self._load_on_demand(name)
        if name in self.adapters:
            self.last_used[name] = time.monotonic()
            return name
        raise ServingError(f"unknown model {name!r}; available: {', '.join([self.base_name, *self.adapters])}", 404)

    def _load_on_demand(self, name: str) -> None:
        """Load ``name``, first evicting the least recently used idle adapter when the resident ones
        are --max-loaded-adapters. When all of them have requests in flight, requests that need room
        queue for it first come, first served, without holding the loading lock (requests for
        resident adapters keep being accepted meanwhile); only the first in line waits against
        adapter_wait_s, so a long line under load is a queue, not a failure. A request for an
        adapter being unloaded waits for the unload to finish and then loads it again: it never
        evicts another adapter to make room for a name that is still resident."""
        ticket = object()
        idle_ones = lambda: [a for a in self.adapters if self.in_use.get(a, 0) == 0]  # noqa: E731
        wait_s = self.limits.adapter_wait_s
        with self.idle:
            self.adapter_line.append(ticket)
        try:
            deadline = None
            while True:
                with self.loading:
                    if name in self.adapters:
                        return
                    with self.idle:
                        draining = name in self.draining
                        full = bool(self.max_loaded_adapters) and len(self._resident()) >= self.max_loaded_adapters
                        first = self.adapter_line[0] is ticket
                        idle = idle_ones() if full and first and not draining else []
                    if not draining and (not full or idle):
                        if idle:
                            victim = min(idle, key=lambda a: self.last_used.get(a, 0.0))
                            self.unload_adapter(victim, timeout=0)
                        self._load(name, self.resolve_adapter_path(name))
                        return
                with self.idle:
                    if draining:  # wait for its unload to finish, then load it again
                        deadline = deadline or time.monotonic() + wait_s
                        if not self.idle.wait_for(lambda: name not in self.draining,
                                                  timeout=max(0.0, deadline - time.monotonic())):
                            raise ServingError(f"adapter {name!r} is being unloaded and stayed busy for "
                                               f"{wait_s:.0f} s; retry shortly", 503)
                        continue
                    if self.adapter_line[0] is not ticket:  # behind others: wait for the line to move
                        self.idle.wait(timeout=1.0)
                        continue
                    deadline = deadline or time.monotonic() + wait_s
                    ready = lambda: bool(idle_ones()) or name in self.adapters  # noqa: E731
                    if not self.idle.wait_for(ready, timeout=max(0.0, deadline - time.monotonic())):
                        raise ServingError(f"all {len(self.adapters)} loaded adapters stayed busy for "
                                           f"{wait_s:.0f} s; retry shortly", 503)
        finally:
            with self.idle:
                self.adapter_line.remove(ticket)
                self.idle.notify_all()

    def submit(self, request: Request) -> None:
        if not self.running:
            raise ServingError("the server is shutting down", 503)
        if self.waiting() >= self.limits.max_queue:
            raise ServingError(f"the queue is full ({self.limits.max_queue} requests waiting); retry later", 429)
        if len(request.prompt_ids) > self.limits.max_prompt_tokens:
            raise ServingError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is "
                               f"{self.limits.max_prompt_tokens}")
        if request.kind == "generate" and not 1 <= request.max_new_tokens <= self.limits.max_new_tokens:
            raise ServingError(f"max_tokens must be between 1 and {self.limits.max_new_tokens}")
        while True:
            if request.adapter != BASE and request.adapter not in self.adapters:
                # evicted since the request named it: load it again, without holding the loading lock
                # (waiting for room while holding it would stop the requests ahead in line)
                self.check_model(request.adapter)
            with self.loading:  # evictions happen under this lock: once counted in use, the adapter stays
                if request.adapter != BASE and request.adapter not in self.adapters:
                    continue  # evicted again in between
                with self.idle:
                    if request.adapter in self.draining:  # its unload began in between: wait, reload
                        continue
                    self.in_use[request.adapter] = self.in_use.get(request.adapter, 0) + 1
                break
        self.stats["requests"] += 1
        self.prometheus.requests.labels(kind=request.kind).inc()
        self.queue.put(request)

    def count_cancelled(self, request: Request) -> None:
        self.stats["cancelled"] += 1
        self.prometheus.cancelled.inc()

    def waiting(self) -> int:
        """Requests accepted but not started yet (those waiting for room for their adapter included)."""
        return self.queue.qsize() + self.waiting_elsewhere() + len(self.adapter_line)

    def _release(self, request: Request) -> None:
        with self.idle:
            self.in_use[request.adapter] -= 1
            self.idle.notify_all()
        self.latencies.append(time.perf_counter() - request.submitted)

    def close(self) -> None:
        self.running = False
        self.queue.put(None)  # wakes the worker
        self.worker.join(timeout=10)

    def metrics(self) -> dict:
        ordered = sorted(self.latencies)
        pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None  # noqa: E731
        return {**self.stats, "queue_length": self.waiting(), "adapters": len(self.adapters),
                "mean_batch_size": round(self.stats["batched_rows"] / max(1, self.stats["batches"]), 2),
                "latency_s": {"p50": pick(0.5), "p95": pick(0.95), "count": len(ordered)}}

    # --- the worker ----------------------------------------------------------------------------
    def _take_batch(self) -> list[Request]:
        first = self.queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.limits.batch_window_s
        while len(batch) < self.limits.max_batch:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)
                break
            batch.append(item)
        return batch

    def _work(self) -> None:
        if self.scheduler == "continuous":
            with self.model_lock:
                fits = self.labels is not None or slot_cache_fits(
                    self.model, self.limits.max_prompt_tokens + self.limits.max_new_tokens)
            if fits:
                ContinuousBatcher(self, self.prefill_chunk).run()
                return
            log.warning("this model's attention does not take the slot cache; serving with static batching")
            self.scheduler = "static"
        self._work_static()

    def _work_static(self) -> None:
        while self.running:
            batch = self._take_batch()
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["batched_rows"] += len(batch)
            started = time.perf_counter()
            for request in batch:
                self.prometheus.queue_time.observe(started - request.submitted)
            self.prometheus.running.set(len(batch))
            for kind, run, what in (("generate", generate_batch, "generation"),
                                    ("classify", classify_batch, "classification")):
                group = [r for r in batch if r.kind == kind]
                if group:
                    self.run_batch(run, group, what)
            self.prometheus.running.set(0)

    def run_batch(self, run, requests: list, what: str) -> None:
        """``run(self, requests)`` under the model lock; a failure fails these requests with a 500,
        never the server; their adapters are released either way."""
        try:
            with self.model_lock, torch.inference_mode():
                run(self, requests)
        except Exception as exc:
            self.stats["failed"] += len(requests)
            self.prometheus.errors.labels(status="500").inc(len(requests))
            for request in requests:
                request.sink("error", ServingError(f"{what} failed: {exc}", 500))
        finally:
            for request in requests:
                self._release(request)
