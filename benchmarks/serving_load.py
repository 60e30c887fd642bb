"""Open-loop load on `lorakit serve` (issue 16): Poisson arrivals, 100 adapters on demand, streaming.

    python -m benchmarks.serving_load [--rates 0.25,0.5,1.5 --requests 32 --adapters 100 --resident 8 --workers 2]

SmolLM2-135M-Instruct on loopback; every request streams /v1/completions with a prompt of 20-400
tokens (rotten-tomatoes reviews strung together), max_tokens 8-128, greedy, and one of 100 LoRA
adapters (r=8 on q,k,v,o, random B) from --adapter-dir, of which 8 stay resident (LRU). The same
requests (same prompts, adapters, lengths) arrive at each rate, open loop: a request is sent at its
arrival time whether or not earlier ones were answered. Side by side in one run:
  continuous - the default scheduler (requests join and leave the batch at every decoding step);
  static     - `--scheduler static` (a batch runs until its longest row ends);
  merged     - one adapter merged into the base, continuous scheduler, the same requests at the
               highest rate (the ceiling: no adapter arithmetic, no loading).
Reports generated tokens/s, time to first token and inter-token latency p50/p95, errors; then checks
every continuous and static reply against offline `generate` with the request's adapter, and
measures prefill alone (one 400-token prompt, max_tokens 1; and 16 of them at once).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import lorakit as lk
from lorakit.hub.models import load_model
from lorakit.serving import BackgroundServer, Engine, Limits
from lorakit.training.data import load_splits

from .common import print_table
from .serving import CLIENT


def make_adapters(base, directory: Path, count: int) -> list[str]:
    """``count`` adapters with distinct random B (A as initialised): one injection, many saves."""
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        names.append(f"a{i:03d}")
        lk.save_adapter(model, directory / names[-1])
    return names


def make_requests(tokenizer, names: list[str], count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    corpus = tokenizer(" ".join(r["text"] for r in load_splits("rotten-tomatoes")["train"][:600]))["input_ids"]
    requests = []
    for _ in range(count):
        length = rng.randint(20, 400)
        start = rng.randrange(len(corpus) - length)
        requests.append({"prompt": tokenizer.decode(corpus[start:start + length]), "adapter": rng.choice(names),
                         "max_tokens": rng.randint(8, 128)})
    return requests


def stream_one(url: str, model: str, job: dict) -> dict:
    """Send one streaming completion; times of its arrival, first token and every later token."""
    sent = time.perf_counter()
    times, text, usage, error = [], [], None, None
    # include_usage: vLLM streams its token counts only when asked (a last chunk with no choices)
    body = {"model": model, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with CLIENT.stream("POST", f"{url}/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"sent": sent, "error": f"HTTP {reply.status_code}: {reply.read()[:200]!r}"}
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        error = repr(exc)
    return {"sent": sent, "times": times, "text": "".join(text), "usage": usage, "error": error,
            "done": time.perf_counter()}


def open_loop(url: str, jobs: list[dict], rate: float, model_of=lambda job: job["adapter"], seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in jobs:
        t += rng.expovariate(rate)
        arrivals.append(t)
    results: list[dict | None] = [None] * len(jobs)
    start = time.perf_counter()

    def fire(i):
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[i] = stream_one(url, model_of(jobs[i]), jobs[i])
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(fire, range(len(jobs))))
    return results


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if not r.get("error")]
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    span = max(r["done"] for r in ok) - min(r["sent"] for r in results) if ok else float("nan")
    return {"tokens_per_s": tokens / span, "tokens": tokens, "wall_s": span,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(itl, 0.5), "itl_p95": percentile(itl, 0.95),
            "errors": len(results) - len(ok), "first_error": next((r["error"] for r in results if r.get("error")), None)}


def prefill_rate(url: str, model: str, tokenizer, prompts: list[str]) -> float:
    """Prompt tokens per second for ``prompts`` sent at once with max_tokens 1. Each prompt is used
    once: a prompt sent again would start from the server's prefix cache."""
    n_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    bodies = [{"model": model, "prompt": p, "max_tokens": 1, "temperature": 0} for p in prompts]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda body: CLIENT.post(f"{url}/v1/completions", json=body), bodies))
    assert all(r.status_code == 200 for r in replies), replies[0].text
    return n_tokens / (time.perf_counter() - start)


def long_prompts(tokenizer, count: int, length: int = 400) -> list[str]:
    """``count`` distinct prompts of ``length`` tokens (consecutive windows of the review corpus)."""
    ids = tokenizer(" ".join(r["text"] for r in load_splits("rotten-tomatoes")["train"][:3000]))["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"the corpus holds {len(ids) // length} prompts of {length} tokens, {count} asked")
    return [tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(count)]


def offline_texts(base, tokenizer, adapter_dir: Path, jobs: list[dict]) -> list[str]:
    model = copy.deepcopy(base)
    texts = []
    for job in jobs:
        lk.load_adapter(model, adapter_dir / job["adapter"], adapter_name="offline")
        enc = tokenizer(job["prompt"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=job["max_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        lk.delete_adapter(model, "offline")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.25,0.5,1.5", help="requests per second, comma separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--resident", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--schedulers", default="continuous,static")
    parser.add_argument("--workers", type=int, default=1, help="engine workers of the continuous and merged servers")
    parser.add_argument("--packed-weights", default="auto", choices=["auto", "on", "off"],
                        help="lorakit serve --packed-weights, for every server of the run")
    parser.add_argument("--packed-prefill", default="auto", choices=["auto", "off"],
                        help="lorakit serve --packed-prefill, for every server of the run")
    parser.add_argument("--no-check", action="store_true", help="skip the offline-generate comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_load.json"))
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(2)
    rates = [float(r) for r in args.rates.split(",")]
    base, tokenizer = load_model("smollm2-135m", "lm")
    base.eval()
    limits = Limits(max_batch=args.max_batch, max_queue=1024, max_new_tokens=128, max_prompt_tokens=512)
    report: dict = {"args": vars(args) | {"out": str(args.out)}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp)
        names = make_adapters(base, adapter_dir, args.adapters)
        jobs = make_requests(tokenizer, names, args.requests)
        prompts = iter(long_prompts(tokenizer, 17 * len(args.schedulers.split(","))))
        replies = {}
        for scheduler in args.schedulers.split(","):
            engine = Engine(copy.deepcopy(base), tokenizer, base_name="smollm2-135m", adapter_dir=tmp, limits=limits,
                            max_loaded_adapters=args.resident, scheduler=scheduler,
                            workers=args.workers if scheduler == "continuous" else 1, packed_weights=args.packed_weights,
                            packed_prefill=args.packed_prefill)
            with BackgroundServer(engine) as server:
                open_loop(server.url, jobs[:2], 10.0)  # warm-up
                report["runs"][f"{scheduler} prefill 1x400"] = {"prefill_tokens_per_s": prefill_rate(
                    server.url, "smollm2-135m", tokenizer, [next(prompts)])}
                report["runs"][f"{scheduler} prefill 16x400"] = {"prefill_tokens_per_s": prefill_rate(
                    server.url, "smollm2-135m", tokenizer, [next(prompts) for _ in range(16)])}
                for rate in rates:
                    results = open_loop(server.url, jobs, rate)
                    replies[(scheduler, rate)] = results
                    report["runs"][f"{scheduler} @ {rate}/s"] = summarise(results)
                    print(scheduler, rate, json.dumps(report["runs"][f"{scheduler} @ {rate}/s"]), flush=True)
            engine.close()
        merged = lk.unload(lk.load_adapter(copy.deepcopy(base), adapter_dir / names[0]), merge=True)
        # at the same batch limit, and at the resident count: with 8 adapters in memory, at most 8
        # requests of distinct adapters run at once (vLLM's max_loras means the same)
        for label, batch in (("merged", args.max_batch), (f"merged, max batch {args.resident}", args.resident)):
            engine = Engine(merged, tokenizer, base_name="merged", limits=dataclasses.replace(limits, max_batch=batch),
                            workers=min(args.workers, batch), packed_weights=args.packed_weights,
                            packed_prefill=args.packed_prefill)
            with BackgroundServer(engine) as server:
                open_loop(server.url, jobs[:2], 10.0, model_of=lambda job: "merged")
                results = open_loop(server.url, jobs, max(rates), model_of=lambda job: "merged")
                report["runs"][f"{label} @ {max(rates)}/s"] = summarise(results)
            engine.close()
        if not args.no_check:
            expected = offline_texts(base, tokenizer, adapter_dir, jobs)
            for (scheduler, rate), results in replies.items():
                equal = sum(r.get("text") == e for r, e in zip(results, expected))
                report["runs"][f"{scheduler} @ {rate}/s"]["equal_to_offline"] = f"{equal}/{len(jobs)}"

    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [(name, fmt(r.get("tokens_per_s")), fmt(r.get("ttft_p50")), fmt(r.get("ttft_p95")),
             fmt(r.get("itl_p50")), fmt(r.get("itl_p95")), r.get("errors", "-"), r.get("equal_to_offline", "-"),
             fmt(r.get("prefill_tokens_per_s")))
            for name, r in report["runs"].items()]
    print_table(f"{args.requests} requests per rate, {args.adapters} adapters ({args.resident} resident), "
                "SmolLM2-135M, 2 CPU threads",
                rows, ("run", "gen tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "errors", "= offline",
                       "prefill tok/s"))
    runs, top, mid = report["runs"], max(rates), sorted(rates)[len(rates) // 2]
    if f"static @ {top}/s" in runs and f"continuous @ {top}/s" in runs:
        c, s = runs[f"continuous @ {top}/s"], runs[f"static @ {top}/s"]
        print(f"throughput continuous / static at {top}/s: {c['tokens_per_s'] / s['tokens_per_s']:.2f} (target >= 2)")
        cm, sm = runs[f"continuous @ {mid}/s"], runs[f"static @ {mid}/s"]
        print(f"TTFT p95 continuous / static at {mid}/s: {cm['ttft_p95'] / sm['ttft_p95']:.2f} (target <= 0.5)")
        for label in ("merged", f"merged, max batch {args.resident}"):
            m = runs[f"{label} @ {top}/s"]
            print(f"{args.adapters} adapters / {label} throughput at {top}/s: "
                  f"{c['tokens_per_s'] / m['tokens_per_s']:.2f} (target >= 0.9)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
