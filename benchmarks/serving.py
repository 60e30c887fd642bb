"""Load test of `lorakit serve` on loopback: 64 concurrent requests over 8 adapters (issues 7, 16).

    python -m benchmarks.serving [--requests 64 --adapters 8 --max-tokens 32 --serial]

Ways to answer the same 64 greedy chat requests (the workload of issue 16's llama.cpp anchor), on
SmolLM2-135M-Instruct:
  mixed   - one server, 8 LoRA adapters, all requests concurrent (mixed-adapter batches), with the
            continuous scheduler and with static batching;
  serial  - (--serial) the same server, the requests one at a time;
  merged  - a server whose base has one adapter merged in, all requests concurrent to it.
Every mixed reply is checked against offline `model.generate` with its adapter.
"""

from __future__ import annotations

import argparse
import copy
import json
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


def make_adapters(base, directory: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        model = copy.deepcopy(base)
        torch.manual_seed(i)  # A's init too: the same adapters in every run, so runs generate the same replies
        lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # a visible but sane change of behaviour per adapter
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        names.append(f"adapter{i}")
        lk.save_adapter(model, directory / names[-1])
    return names


def anchor_messages(count: int) -> list[list[dict]]:
    """The anchor workload's chat requests: rotten-tomatoes test reviews to summarise."""
    reviews = load_splits("rotten-tomatoes")["test"][:count]
    return [[{"role": "user", "content": f"Summarise this review in a few words: {r['text']}"}] for r in reviews]


def anchor_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """The token ids the anchor workload's first ``count`` requests give the engine (chat template
    applied, generation prompt added)."""
    prompts = []
    for messages in anchor_messages(count):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


# One client for every request, as a load generator keeps its connections: a new httpx client
# per request builds an SSL context (~23 ms of CPU each), which on these 2 cores took CPU from
# whichever server was being measured, most of it in the first burst of 64.
CLIENT = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))


def ask(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    reply = CLIENT.post(f"{url}/v1/chat/completions",
                        json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    reply.raise_for_status()
    return reply.json()


def run(url: str, jobs: list[tuple[str, list[dict]]], max_tokens: int, concurrent: bool) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: ask(url, job[0], job[1], max_tokens), jobs))
    else:
        replies = [ask(url, model, messages, max_tokens) for model, messages in jobs]
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--serial", action="store_true", help="also send the requests one at a time")
    parser.add_argument("--out", type=Path, default=Path("bench-out/serving.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    base, tokenizer = load_model("smollm2-135m", "lm")
    base.eval()
    limits = Limits(max_batch=args.max_batch, max_queue=4 * args.requests, max_new_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(base, Path(tmp), args.adapters)
        jobs = [(names[i % len(names)], messages) for i, messages in enumerate(anchor_messages(args.requests))]
        results, batches = {}, {}
        for scheduler in ("continuous", "static"):
            engine = Engine(copy.deepcopy(base), tokenizer, base_name="smollm2-135m", adapter_dir=tmp, limits=limits,
                            scheduler=scheduler)
            for name in names:
                engine.pool.load(name)
            with BackgroundServer(engine) as server:
                run(server.url, jobs[:4], 4, concurrent=True)  # warm-up
                results[scheduler] = run(server.url, jobs, args.max_tokens, concurrent=True)
                batches[scheduler] = engine.metrics()["mean_batch_size"]
                if args.serial and scheduler == "continuous":
                    results["serial"] = run(server.url, jobs, args.max_tokens, concurrent=False)
            engine.close()
        mixed_s, mixed = results["continuous"]

        merged_model = lk.load_adapter(copy.deepcopy(base), Path(tmp) / names[0])
        merged_model = lk.unload(merged_model, merge=True)
        merged_engine = Engine(merged_model, tokenizer, base_name="merged", limits=limits)
        with BackgroundServer(merged_engine) as server:
            run(server.url, [("merged", m) for _, m in jobs[:4]], 4, concurrent=True)
            merged_s, merged = run(server.url, [("merged", m) for _, m in jobs], args.max_tokens, concurrent=True)

        # correctness: every mixed reply equals offline generate with its adapter
        correct = 0
        offline = {name: lk.load_adapter(copy.deepcopy(base), Path(tmp) / name) for name in names}
        for (name, messages), reply in zip(jobs, mixed):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = offline[name].generate(**enc, max_new_tokens=args.max_tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += int(reply["choices"][0]["message"]["content"] == expected)

    tokens = lambda replies: sum(r["usage"]["completion_tokens"] for r in replies)  # noqa: E731
    rows = {"mixed, continuous (8 adapters, concurrent)": (mixed_s, tokens(mixed)),
            "mixed, static batching": (results["static"][0], tokens(results["static"][1])),
            **({"serial (one at a time)": (results["serial"][0], tokens(mixed))} if "serial" in results else {}),
            "merged single adapter (concurrent)": (merged_s, tokens(merged))}
    print_table(f"{args.requests} chat requests, max_tokens {args.max_tokens}, greedy, SmolLM2-135M on 2 CPU cores",
                [(k, f"{s:.1f}", n, f"{n / s:.1f}") for k, (s, n) in rows.items()],
                ("mode", "wall s", "tokens", "tokens/s"))
    mixed_tps = rows["mixed, continuous (8 adapters, concurrent)"][1] / mixed_s
    merged_tps = rows["merged single adapter (concurrent)"][1] / merged_s
    static_correct = sum(int(a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"])
                         for a, b in zip(results["static"][1], mixed))
    print(f"answered {len(mixed)}/{args.requests}; equal to offline generate: {correct}/{args.requests}; static "
          f"batching's replies equal to continuous: {static_correct}/{args.requests}; mean rows per step {batches}")
    print(f"mixed / merged throughput = {mixed_tps / merged_tps:.2f} (target >= 0.9); continuous / static = "
          f"{results['static'][0] / mixed_s:.2f}x; llama-server's anchor on this workload: 50-56 base, 28-29 "
          f"with 8 LoRAs (issue 16)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "correct": correct, "answered": len(mixed),
                                    "mixed_over_merged": mixed_tps / merged_tps, "mean_batch": batches,
                                    "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in mixed)}, indent=2))


if __name__ == "__main__":
    main()
