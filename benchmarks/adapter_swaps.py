"""What 100 adapters with 8 resident cost against the merged model held to 8 rows, part by part (issue 26).

    python -m benchmarks.adapter_swaps [--cases merged8,spread8,preloaded100,resident8] [--rounds 2]
    python -m benchmarks.adapter_swaps --cases resident8 --lorakit /path/to/other/checkout

``benchmarks.serving_load``'s 32 requests at 1.5/s over loopback (SmolLM2-135M in fp32, 2 workers, max
batch 16, at most 8 rows for merged8), one case after another, each round in the same order:
  merged8       - one adapter merged into the base, at most 8 rows (the ceiling with 8 adapter slots);
  spread8       - the requests mapped onto 8 adapters, all loaded before the timing: LoRA, no loads;
  preloaded100  - 100 adapters, all resident and loaded before the timing: no loads, no slot waits;
  resident100   - 100 adapters loaded on demand, none evicted: the loads alone;
  resident8     - 100 adapters, 8 resident: what serving_load measures (loads, hot swaps, slot waits).
Besides tokens/s it adds up, over the run: the workers' idle time, their forwards' waits for the
model lock's exclusive turns, those turns (how many, held, waited for), and the time spent stacking
adapters (LoraLayer.mixed_stacks calls that built new stacks, every thread).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import tempfile
import threading
import time
from pathlib import Path

from .common import parse_with_checkout

CASES = ("merged8", "spread8", "preloaded100", "resident100", "resident8")
WAITS = "forwards' waits for exclusive turns, s"


def instrument(totals: collections.Counter) -> None:
    """Wrap the model lock, the engine's queue and the layers' stacking to add up their times."""
    from lorakit.layers.base import LoraLayer
    from lorakit.serving.engine import Engine
    from lorakit.serving.locks import ModelLock

    shared = ModelLock.shared

    @contextlib.contextmanager
    def timed_shared(lock):
        start = time.perf_counter()
        with shared(lock):
            totals[WAITS] += time.perf_counter() - start
            yield

    acquire, release = ModelLock.acquire, ModelLock.release

    def timed_acquire(lock):
        start = time.perf_counter()
        acquire(lock)
        totals["exclusive turns"] += 1
        totals["exclusive waited, s"] += time.perf_counter() - start
        lock.turn_started = time.perf_counter()

    def timed_release(lock):
        totals["exclusive held, s"] += time.perf_counter() - lock.turn_started
        release(lock)

    take = Engine.take

    def timed_take(engine, block, timeout=None):
        start = time.perf_counter()
        try:
            return take(engine, block, timeout)
        finally:
            if block and threading.current_thread().name.startswith("lorakit"):
                totals["workers idle, s"] += time.perf_counter() - start

    stacks = LoraLayer.mixed_stacks

    def timed_stacks(layer, names):
        kept, start = layer.__dict__.get("_mixed_cache"), time.perf_counter()
        result = stacks(layer, names)
        if layer.__dict__.get("_mixed_cache") is not kept:
            totals["stacking, s"] += time.perf_counter() - start
            totals["layers stacked"] += 1
        return result

    ModelLock.shared, ModelLock.acquire, ModelLock.release = timed_shared, timed_acquire, timed_release
    Engine.take, LoraLayer.mixed_stacks = timed_take, timed_stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="merged8,spread8,preloaded100,resident8")
    parser.add_argument("--rounds", type=int, default=1)
    args = parse_with_checkout(parser)
    import torch

    import lorakit as lk
    from lorakit.cli import quiet_libraries
    from lorakit.hub.models import load_model
    from lorakit.serving import BackgroundServer, Engine, Limits

    from .common import print_table
    from .serving_load import make_adapters, make_requests, open_loop, summarise

    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    quiet_libraries()
    torch.set_num_threads(2)
    totals: collections.Counter = collections.Counter()
    instrument(totals)
    base, tokenizer = load_model("smollm2-135m", "lm")
    base.eval()
    limits = Limits(max_batch=16, max_queue=1024, max_new_tokens=128, max_prompt_tokens=512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(base, Path(tmp), 100)
        jobs = make_requests(tokenizer, names, 32)
        merged = lk.unload(lk.load_adapter(copy.deepcopy(base), Path(tmp) / names[0]), merge=True)
        for _ in range(args.rounds):
            for case in cases:
                if case == "merged8":
                    engine = Engine(copy.deepcopy(merged), tokenizer, base_name="merged", workers=2,
                                    limits=dataclasses.replace(limits, max_batch=8))
                    model_of = lambda job: "merged"  # noqa: E731
                else:
                    resident = 8 if case in ("spread8", "resident8") else 100
                    engine = Engine(copy.deepcopy(base), tokenizer, base_name="smollm2-135m", adapter_dir=tmp,
                                    limits=limits, max_loaded_adapters=resident, workers=2)
                    model_of = ((lambda job: names[int(job["adapter"][1:]) % 8]) if case == "spread8"
                                else (lambda job: job["adapter"]))
                with BackgroundServer(engine) as server:
                    if case in ("spread8", "preloaded100"):  # every adapter of the run loaded first
                        used = sorted({model_of(job) for job in jobs})
                        open_loop(server.url, [{"prompt": "Hi", "adapter": n, "max_tokens": 1} for n in used], 50.0)
                    open_loop(server.url, jobs[:2], 10.0, model_of=model_of)  # warm-up
                    totals.clear()
                    result = summarise(open_loop(server.url, jobs, 1.5, model_of=model_of))
                engine.close()
                rows.append((case, f"{result['tokens_per_s']:.1f}", f"{result['ttft_p50']:.1f}", result["errors"],
                             f"{totals['workers idle, s']:.1f}", f"{totals[WAITS]:.1f}",
                             totals["exclusive turns"], f"{totals['exclusive held, s']:.2f}",
                             f"{totals['exclusive waited, s']:.1f}", totals["layers stacked"],
                             f"{totals['stacking, s']:.1f}"))
                print(*rows[-1], flush=True)
    print_table("32 requests at 1.5/s, 100 adapters (SmolLM2-135M, 2 workers, 2 CPU threads)", rows,
                ("case", "tok/s", "TTFT p50", "errors", "idle s", "forwards' waits s", "exclusive turns",
                 "held s", "waited s", "layers stacked", "stacking s"))


if __name__ == "__main__":
    main()
