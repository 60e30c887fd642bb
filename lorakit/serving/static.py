"""Static batching: whatever arrived within a short window, up to max_batch, runs together until
its last row finishes (decoding.generate_batch); a request arriving mid-batch waits for the next."""

from __future__ import annotations

import queue
import time

from .decoding import classify_batch, generate_batch


class StaticBatcher:
    def __init__(self, engine):
        self.engine = engine

    def run(self) -> None:
        engine = self.engine
        while engine.running:
            batch = self._take_batch()
            if not batch:
                continue
            engine.counters.step(len(batch))
            for request in batch:
                engine.counters.started(request)
            engine.counters.running(len(batch))
            for kind, run, what in (("generate", generate_batch, "generation"),
                                    ("classify", classify_batch, "classification")):
                group = [r for r in batch if r.kind == kind]
                if group:
                    engine.run_batch(run, group, what)
            engine.counters.running(0)

    def _take_batch(self) -> list:
        first = self.engine.take(block=True)
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.engine.limits.batch_window_s
        while len(batch) < self.engine.limits.max_batch:
            try:
                item = self.engine.take(block=True, timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is None:
                break
            batch.append(item)
        return batch
