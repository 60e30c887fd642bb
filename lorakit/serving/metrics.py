"""Prometheus metrics of a serving engine (prometheus_client), one registry per engine.

Counters: requests by kind, answers with an error by status code, prompt and generated tokens.
Histograms: time to first token, inter-token latency, time waiting in the queue.
Gauges: requests running, requests waiting, adapters loaded. ``Counters`` keeps these and the JSON
totals of /v1/stats together.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting, loaded_adapters):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests accepted, by kind", ["kind"], registry=registry)
        self.errors = Counter("lorakit_request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=registry)
        self.cancelled = Counter("lorakit_cancelled_requests", "Requests dropped because their client disconnected",
                                 registry=registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("lorakit_generated_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("lorakit_time_to_first_token_seconds", "Submission to first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("lorakit_inter_token_latency_seconds", "Time between a request's tokens",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("lorakit_queue_time_seconds", "Submission to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.prefix_queried = Counter("lorakit_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=registry)
        self.prefix_hits = Counter("lorakit_prefix_cache_hits", "Prompt tokens whose keys and values came from the "
                                   "prefix cache", registry=registry)
        self.prefix_hit_rate = Gauge("lorakit_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the "
                                     "prefix cache", registry=registry)
        self.kv_cache_bytes = Gauge("lorakit_kv_cache_bytes", "Memory held by the KV cache of running requests",
                                    registry=registry)
        self.running = Gauge("lorakit_running_requests", "Requests being decoded", registry=registry)
        Gauge("lorakit_waiting_requests", "Requests waiting in the queue", registry=registry).set_function(waiting)
        Gauge("lorakit_loaded_adapters", "Adapters loaded", registry=registry).set_function(loaded_adapters)

    def token(self, request) -> None:
        """A request produced a token: time to first token, or the gap since its previous one."""
        now = time.perf_counter()
        last = getattr(request, "last_token_at", None)
        if last is None:
            self.time_to_first_token.observe(now - request.submitted)
        else:
            self.inter_token_latency.observe(now - last)
        request.last_token_at = now
        self.generated_tokens.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Counters:
    """What the engine and its schedulers count, kept in two views at once: the JSON totals of
    /v1/stats (``stats``) and the Prometheus series of /metrics (``prometheus``)."""

    def __init__(self, waiting, loaded_adapters):
        self.stats = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "batches": 0,
                      "batched_rows": 0, "cancelled": 0,
                      "prefix_cache": {"queried_tokens": 0, "hit_tokens": 0, "hit_rate": 0.0, "bytes": 0},
                      "kv_cache": {"slots": 0, "columns": 0, "bytes": 0}}
        self.latencies: deque[float] = deque(maxlen=2000)
        self.prometheus = ServerMetrics(waiting=waiting, loaded_adapters=loaded_adapters)
        self._lock = threading.Lock()  # several workers report at once
        self._kv_caches: dict[int, object] = {}  # per worker
        self._running: dict[int, int] = {}

    def accepted(self, request) -> None:
        self.stats["requests"] += 1
        self.prometheus.requests.labels(kind=request.kind).inc()

    def started(self, request) -> None:
        """The request leaves the queue for a batch."""
        self.prometheus.queue_time.observe(time.perf_counter() - request.submitted)

    def step(self, rows: int) -> None:
        """One forward over ``rows`` requests (a static batch, or one decoding step)."""
        self.stats["batches"] += 1
        self.stats["batched_rows"] += rows

    def running(self, rows: int, worker: int = 0) -> None:
        """Worker ``worker`` is decoding or prefilling ``rows`` requests; the gauge is the sum."""
        with self._lock:
            self._running[worker] = rows
            self.prometheus.running.set(sum(self._running.values()))

    def prompt(self, tokens: int) -> None:
        self.prometheus.prompt_tokens.inc(tokens)
        self.stats["prompt_tokens"] += tokens

    def prefix(self, cache) -> None:
        """The prefix cache after a prefill: its totals into both views."""
        with self._lock:
            seen = self.stats["prefix_cache"]
            self.prometheus.prefix_queried.inc(cache.queried - seen["queried_tokens"])
            self.prometheus.prefix_hits.inc(cache.hit - seen["hit_tokens"])
            self.prometheus.prefix_hit_rate.set(cache.hit_rate())
            self.stats["prefix_cache"] = {"queried_tokens": cache.queried, "hit_tokens": cache.hit,
                                          "hit_rate": round(cache.hit_rate(), 4), "bytes": cache.bytes}

    def kv_cache(self, cache, worker: int = 0) -> None:
        """Worker ``worker``'s slot cache, after it is reserved or grows: slots and bytes summed over
        the workers, columns the longest any slot holds."""
        with self._lock:
            self._kv_caches[worker] = cache
            caches = list(self._kv_caches.values())
            total = sum(c.bytes() for c in caches)
            self.prometheus.kv_cache_bytes.set(total)
            self.stats["kv_cache"] = {"slots": sum(c.slots for c in caches),
                                      "columns": max(c.capacity for c in caches), "bytes": total}

    def completion(self, tokens: int) -> None:
        self.stats["completion_tokens"] += tokens  # the Prometheus counter counts each token as it comes

    def failed(self, requests: int, status: int) -> None:
        self.stats["failed"] += requests
        self.prometheus.errors.labels(status=str(status)).inc(requests)

    def cancelled(self) -> None:
        self.stats["cancelled"] += 1
        self.prometheus.cancelled.inc()

    def finished(self, request) -> None:
        self.latencies.append(time.perf_counter() - request.submitted)

    def summary(self, waiting: int, adapters: int) -> dict:
        ordered = sorted(self.latencies)
        pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None  # noqa: E731
        return {**self.stats, "queue_length": waiting, "adapters": adapters,
                "mean_batch_size": round(self.stats["batched_rows"] / max(1, self.stats["batches"]), 2),
                "latency_s": {"p50": pick(0.5), "p95": pick(0.95), "count": len(ordered)}}
