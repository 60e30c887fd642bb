"""The serving anchor workload inside one process, no HTTP: where the engine's time goes (issue 26).

    python -m benchmarks.serving_engine [--dtype bf16 --adapters 8 --max-batch 64]
    python -m benchmarks.serving_engine --lorakit /path/to/other/checkout   # the same on another commit
    python -m benchmarks.serving_engine --dtype fp32 --packed-weights off    # fp32 without packed weights
    python -m benchmarks.serving_engine --cold       # the burst meets an empty prefix cache (a fresh server)

benchmarks/serving.py's 64 chat requests (max_tokens 32, greedy, SmolLM2-135M-Instruct), handed to
``Engine.submit_all`` at once, request i on adapter i mod N (N=0: the base model). Prints generated
tokens/s and the time in prefill forwards and in decoding steps with the tokens each fed (padding
included), and the prefix cache's hit rate. With --lorakit the package is imported from that
checkout, so two commits compare on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import collections
import copy
import resource
import tempfile
import threading
import time
from pathlib import Path

from .common import parse_with_checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--adapters", type=int, default=8, help="0: every request to the base model")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="engine worker threads (lorakit serve --workers)")
    parser.add_argument("--requests", type=int, default=64, help="the anchor workload's first N requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (a decode-heavy "
                                                                   "run: more tokens, fewer requests)")
    parser.add_argument("--packed-weights", choices=["auto", "on", "off"],
                        help="lorakit serve --packed-weights (default: the engine's own default)")
    parser.add_argument("--packed-prefill", choices=["auto", "off"],
                        help="lorakit serve --packed-prefill (default: the engine's own default)")
    parser.add_argument("--decode-kernel", choices=["auto", "off"],
                        help="lorakit serve --decode-kernel (default: the engine's own default)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the prefix cache after the warm-up: the burst meets a fresh server")
    parser.add_argument("--lora-kernel", choices=["auto", "off"],
                        help="lorakit serve --lora-kernel (default: the engine's own default)")
    args = parse_with_checkout(parser)
    import torch

    from lorakit.hub.models import load_model
    from lorakit.serving import Engine, Limits, continuous
    from lorakit.serving.requests import Request

    from .serving import anchor_prompt_ids, make_adapters

    torch.set_num_threads(2)
    spent, fed = collections.Counter(), collections.Counter()
    forward = continuous.ContinuousBatcher._forward

    def timed(self, rows, first_slot, ids, starts, last=None):  # summed over workers when several
        start = time.perf_counter()
        result = forward(self, rows, first_slot, ids, starts, last)
        phase = "decode" if ids.shape[1] == 1 else "prefill"
        spent[phase] += time.perf_counter() - start
        fed[phase] += ids.numel()
        return result
    continuous.ContinuousBatcher._forward = timed
    forward_packed = getattr(continuous.ContinuousBatcher, "_forward_packed", None)

    def timed_packed(self, adapter, first_slot, fed_ids, starts):  # packed prefill: real tokens only
        start = time.perf_counter()
        result = forward_packed(self, adapter, first_slot, fed_ids, starts)
        spent["prefill"] += time.perf_counter() - start
        fed["prefill"] += sum(map(len, fed_ids))
        return result
    if forward_packed is not None:
        continuous.ContinuousBatcher._forward_packed = timed_packed

    base, tokenizer = load_model("smollm2-135m", "lm", dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    base.eval()
    prompts = anchor_prompt_ids(tokenizer, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(base, Path(tmp), args.adapters) if args.adapters else []
        engine = Engine(copy.deepcopy(base), tokenizer, base_name="base", adapter_dir=tmp,
                        limits=Limits(max_batch=args.max_batch, max_queue=512, max_new_tokens=args.max_tokens),
                        **({"workers": args.workers} if args.workers > 1 else {}),
                        **({"packed_weights": args.packed_weights} if args.packed_weights else {}),
                        **({"packed_prefill": args.packed_prefill} if args.packed_prefill else {}),
                        **({"decode_kernel": args.decode_kernel} if args.decode_kernel else {}),
                        **({"lora_kernel": args.lora_kernel} if args.lora_kernel else {}))
        print("packed weights:", getattr(engine, "packed_weights_note", "(this checkout has none)"))
        print("packed prefill:", getattr(engine, "packed_prefill_note", "(this checkout has none)"))
        print("decoding attention:", getattr(engine, "decode_kernel_note", "(this checkout has none)"))
        print("adapters in decoding steps:", getattr(engine, "lora_kernel_note", "(this checkout has none)"))
        for name in names:
            engine.pool.load(name)

        def answer(count: int, max_tokens: int) -> tuple[float, list]:
            results, left, done = [None] * count, [count], threading.Event()

            def sink_for(i):
                def sink(kind, payload):
                    if kind in ("done", "error"):
                        results[i] = payload
                        left[0] -= 1
                        if not left[0]:
                            done.set()
                return sink
            requests = [Request("generate", names[i % len(names)] if names else "__base__", prompts[i], sink_for(i),
                                max_new_tokens=max_tokens) for i in range(count)]
            start = time.perf_counter()
            engine.submit_all(requests)
            done.wait()
            return time.perf_counter() - start, results
        answer(4, 4)  # warm-up: first forwards, the adapters' stacks
        if args.cold:
            with engine.prefix_cache.lock:
                engine.prefix_cache.entries.clear()
                engine.prefix_cache.bytes = 0  # (its counters run on: /metrics counts on from them)
        spent.clear()
        fed.clear()
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds, results = answer(len(prompts), args.max_tokens)
        after = resource.getrusage(resource.RUSAGE_SELF)
        metrics = engine.metrics()
        engine.close()
    failed = [r for r in results if not isinstance(r, dict)]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, the first: {failed[0]}")
    tokens = sum(r["completion_tokens"] for r in results)
    print(f"{args.dtype}, {args.adapters or 'no'} adapters, max batch {args.max_batch}: {seconds:.2f} s, {tokens} "
          f"tokens, {tokens / seconds:.1f} tokens/s; prompt tokens {sum(map(len, prompts))}")
    for phase in ("prefill", "decode"):
        print(f"  {phase}: {spent[phase]:.2f} s, {fed[phase]} tokens fed, {fed[phase] / max(spent[phase], 1e-9):.0f} "
              f"tokens/s")
    print(f"  CPU: user {after.ru_utime - before.ru_utime:.1f} s, system {after.ru_stime - before.ru_stime:.1f} s, "
          f"{after.ru_minflt - before.ru_minflt} page faults; peak RSS {after.ru_maxrss / 2**20:.2f} GiB")
    print(f"  mean rows per decoding step {metrics['mean_batch_size']}; prefix cache {metrics.get('prefix_cache')}")


if __name__ == "__main__":
    main()
