"""`lorakit serve` side by side with vLLM's CPU build on the serving anchor workload (issue 26).

    python -m benchmarks.serving_vs_vllm --vllm-python ~/.cache/vllm-cpu-venv/bin/python \\
        [--dtypes bf16,fp32 --rates 0.25,0.5,1.5 --load-requests 16 --max-batch 64]

../shared/anchors/vllm-cpu.md says how to install vLLM-CPU 0.32.0 in its own venv. Both servers run
as their own processes on the same 2 cores, one at a time, back to back, each given the same
SmolLM2-135M-Instruct weights (lorakit's safetensors cache of the GGUF) and the same 8 PEFT adapters
(r=8 on q,k,v,o, random B, written by lorakit). For each dtype and server:
  - the anchor workload (benchmarks/serving.py's 64 concurrent greedy chat requests, max_tokens 32):
    to the base model and with request i naming adapter i mod 8; generated tokens per second;
  - (--rates, in --ttft-dtype: by default the dtype `lorakit serve --dtype auto` picks on this CPU,
    bf16 where it has native bf16 matrix units, else fp32) open-loop Poisson load with streaming
    (benchmarks/serving_load.py's requests over the 8 adapters): time to first token p50 / p95 per rate;
  - (--prefill-prompts N) prompt prefill through HTTP: N distinct 400-token prompts one at a time,
    max_tokens 1, to the base model (none repeats, so no prefix cache hit); the median prompt tokens/s.
The CPU (model, native bf16 unit or none) is printed and recorded with the results: the ratios
differ between an AMX machine and an AVX2-only one.
vLLM runs with its defaults plus --enable-lora (prefix caching on); "vLLM compiled" is the same
server without --enable-lora (its compiled path; base requests only). Replies are compared between
the servers request by request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lorakit.hub.models import load_model
from lorakit.kernels.cpu import cpuinfo_value, native_bf16
from lorakit.serving.server import resolve_dtype

from .common import print_table
from .serving import anchor_messages, make_adapters, run
from .serving_load import long_prompts, make_requests, open_loop, prefill_rate, summarise

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def start(command: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{command[:3]} did not become healthy; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def vllm_command(python: str, model_dir: Path, port: int, dtype: str) -> list[str]:
    """vLLM-CPU's OpenAI server for the model, served as "base" (its compiled path: add
    --enable-lora and its options for adapters)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "base", "--dtype", VLLM_DTYPES[dtype], "--max-model-len", "2048"]


def servers(args, model_dir: Path, adapter_dir: Path, names: list[str], dtype: str) -> dict[str, tuple]:
    """name -> (command, env, base model name, serves adapters)."""
    lora_specs = [f"{n}={adapter_dir / n}" for n in names]
    vllm = vllm_command(args.vllm_python, model_dir, args.port, dtype)
    lorakit = [sys.executable, "-m", "lorakit", "serve", "--model", "smollm2-135m", "--port", str(args.port),
               "--dtype", dtype, "--max-batch", str(args.max_batch), "--max-queue", "1024",
               *[x for spec in lora_specs for x in ("--adapter", spec)], "--workers", args.workers,
               "--packed-prefill", args.packed_prefill, "--decode-kernel", args.decode_kernel]
    table = {"lorakit": (lorakit, {}, "smollm2-135m", True)}
    for flags in args.also_lorakit or []:  # the same server with other flags (the last of a flag given wins)
        table[f"lorakit {flags}"] = (lorakit + flags.split(), {}, "smollm2-135m", True)
    if args.vllm_python:
        table["vLLM --enable-lora"] = (vllm + ["--enable-lora", "--max-loras", "8", "--max-lora-rank", "8",
                                               "--max-cpu-loras", "8", "--lora-modules", *lora_specs],
                                       VLLM_ENV, "base", True)
        table["vLLM compiled (no LoRA)"] = (vllm, VLLM_ENV, "base", False)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="python of the vLLM-CPU venv (without it: lorakit alone)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rates", default="0.25,0.5,1.5", help="open-loop rates for TTFT; '' to skip")
    parser.add_argument("--ttft-dtype", default="auto", help="the dtype the TTFT runs use (auto: lorakit serve's)")
    parser.add_argument("--load-requests", type=int, default=16, help="requests per open-loop rate")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--workers", default="auto", help="lorakit serve --workers")
    parser.add_argument("--packed-prefill", default="auto", choices=["auto", "off"], help="lorakit serve --packed-prefill")
    parser.add_argument("--decode-kernel", default="auto", choices=["auto", "off"], help="lorakit serve --decode-kernel")
    parser.add_argument("--also-lorakit", action="append", metavar="FLAGS",
                        help="also run lorakit serve with these extra flags (e.g. '--decode-kernel off'), in the same "
                             "run: an A/B on one machine's minute; repeatable")
    parser.add_argument("--prefill-prompts", type=int, default=3, help="400-token prompts for the prefill figure; 0 skips it")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_vs_vllm.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    ttft_dtype = resolve_dtype(args.ttft_dtype)[0]
    cpu = {"model": cpuinfo_value("model name") or "unknown", "native_bf16": native_bf16()}
    print(f"CPU: {cpu['model']}; native bf16 unit: {cpu['native_bf16'] or 'none'}; TTFT runs in {ttft_dtype}")
    base, tokenizer = load_model("smollm2-135m", "lm")
    model_dir = Path(base.name_or_path)
    messages = anchor_messages(args.requests)
    rates = [float(r) for r in args.rates.split(",") if r]
    url = f"http://127.0.0.1:{args.port}"
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(base, Path(tmp), 8)
        load_jobs = make_requests(tokenizer, names, args.load_requests)
        long = long_prompts(tokenizer, args.prefill_prompts)  # every server gets the same prompts
        for dtype in args.dtypes.split(","):
            for server, (command, env, base_name, lora) in servers(args, model_dir, Path(tmp), names, dtype).items():
                key = f"{server}, {dtype}"
                process = start(command, env, url, Path(tmp) / "server.log")
                try:
                    run(url, [(base_name, m) for m in messages[:4]], 4, concurrent=True)  # warm-up
                    row = {}
                    for label, model_of in (("base", lambda i: base_name), ("8 adapters", lambda i: names[i % 8])):
                        if label == "8 adapters" and not lora:
                            continue
                        seconds, replies = run(url, [(model_of(i), m) for i, m in enumerate(messages)],
                                               args.max_tokens, concurrent=True)
                        tokens = sum(r["usage"]["completion_tokens"] for r in replies)
                        row[label] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                                      "texts": [r["choices"][0]["message"]["content"] for r in replies]}
                    if dtype == ttft_dtype and lora:
                        for rate in rates:
                            got = open_loop(url, load_jobs, rate, model_of=lambda job: job["adapter"])
                            row[f"load {rate}"] = summarise(got)
                    if long:
                        rates_seen = [prefill_rate(url, base_name, tokenizer, [prompt]) for prompt in long]
                        row["prefill 1x400"] = {"prompt_tokens_per_s": statistics.median(rates_seen),
                                                "each": rates_seen}
                    metrics = httpx.get(f"{url}/metrics", timeout=10).text
                    row["prefix_cache_lines"] = [line for line in metrics.splitlines()
                                                 if "prefix_cache" in line and not line.startswith("#")][:6]
                finally:
                    stop(process)
                results[key] = row
                print(key, {k: round(v["tokens_per_s"], 1) for k, v in row.items() if "tokens_per_s" in v},
                      {k: round(v["prompt_tokens_per_s"], 1) for k, v in row.items() if "prompt_tokens_per_s" in v},
                      flush=True)

    rows = []
    for key, row in results.items():
        rows.append((key, *(f"{row[m]['tokens_per_s']:.1f}" if m in row else "-" for m in ("base", "8 adapters"))))
    print_table(f"{args.requests} chat requests, max_tokens {args.max_tokens}, greedy, SmolLM2-135M, 2 cores, "
                "generated tokens/s", rows, ("server", "base", "8 adapters"))
    for dtype in args.dtypes.split(","):
        ours = results.get(f"lorakit, {dtype}", {})
        for flags in args.also_lorakit or []:
            other = results.get(f"lorakit {flags}, {dtype}", {})
            for mode in ("base", "8 adapters"):
                if mode in ours and mode in other:
                    same = sum(a == b for a, b in zip(ours[mode]["texts"], other[mode]["texts"]))
                    print(f"{dtype} {mode}: lorakit / lorakit {flags} = "
                          f"{ours[mode]['tokens_per_s'] / other[mode]['tokens_per_s']:.2f}x; equal replies "
                          f"{same}/{len(ours[mode]['texts'])}")
        for server in ("vLLM --enable-lora", "vLLM compiled (no LoRA)"):
            theirs = results.get(f"{server}, {dtype}")
            if not theirs or not ours:
                continue
            for mode in ("base", "8 adapters"):
                if mode in ours and mode in theirs:
                    same = sum(a == b for a, b in zip(ours[mode]["texts"], theirs[mode]["texts"]))
                    print(f"{dtype} {mode}: lorakit / {server} = {ours[mode]['tokens_per_s'] / theirs[mode]['tokens_per_s']:.2f}x; "
                          f"equal replies {same}/{len(ours[mode]['texts'])}")
            if "prefill 1x400" in ours and "prefill 1x400" in theirs:
                print(f"{dtype} prefill 1x400: lorakit {ours['prefill 1x400']['prompt_tokens_per_s']:.0f} / {server} "
                      f"{theirs['prefill 1x400']['prompt_tokens_per_s']:.0f} prompt tokens/s = "
                      f"{ours['prefill 1x400']['prompt_tokens_per_s'] / theirs['prefill 1x400']['prompt_tokens_per_s']:.2f}x")
            if "8 adapters" in ours:
                print(f"{dtype}: lorakit 8 adapters / {server} base = "
                      f"{ours['8 adapters']['tokens_per_s'] / theirs['base']['tokens_per_s']:.2f}x")
        for rate in rates:
            cells = [(s, results[f"{s}, {dtype}"].get(f"load {rate}")) for s in ("lorakit", "vLLM --enable-lora")
                     if f"{s}, {dtype}" in results]
            cells = [(s, c) for s, c in cells if c]
            if cells:
                print(f"{dtype} rate {rate}/s TTFT p50/p95: " + "; ".join(
                    f"{s} {c.get('ttft_p50')}/{c.get('ttft_p95')} s" for s, c in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, **results}, indent=2))


if __name__ == "__main__":
    main()
