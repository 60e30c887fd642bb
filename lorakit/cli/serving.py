"""CLI command: lorakit serve."""

from __future__ import annotations

import argparse
import os


def _serve(args: argparse.Namespace) -> int:
    from ..serving.engine import Limits
    from ..serving.server import build_engine, parse_adapter_specs, resolve_dtype, resolve_workers, serve

    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_tokens_limit,
                    max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                    kv_cache_mb=args.kv_cache_mb)
    dtype, why = resolve_dtype(args.dtype)
    workers, workers_why = resolve_workers(args.workers, args.scheduler, args.max_batch)
    print(f"dtype: {dtype} ({why})")
    print(f"workers: {workers} ({workers_why})")
    engine = build_engine(args.model, parse_adapter_specs(args.adapter or []), args.adapter_dir, limits, dtype,
                          args.max_loaded_adapters, args.scheduler, args.prefill_chunk, args.prefix_cache_mb,
                          qlora=args.qlora, workers=workers, packed_weights=args.packed_weights,
                          packed_prefill=args.packed_prefill, decode_kernel=args.decode_kernel,
                          lora_kernel=args.lora_kernel)
    print(f"packed weights: {engine.packed_weights_note}")
    print(f"packed prefill: {engine.packed_prefill_note}")
    print(f"decoding attention: {engine.decode_kernel_note}")
    print(f"adapters in decoding steps: {engine.lora_kernel_note}")
    print(f"serving {engine.base_name} with adapters {engine.adapters or '(none)'} on http://{args.host}:{args.port}")
    serve(engine, args.host, args.port, args.api_key or os.environ.get("LORAKIT_API_KEY"))
    return 0


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP server: one base model, many adapters, mixed-adapter batching",
                           description="OpenAI-style /v1/completions, /v1/chat/completions (stream: true for SSE), "
                                       "/v1/classify, /v1/models, /v1/adapters (and vLLM's /v1/load_lora_adapter, "
                                       "/v1/unload_lora_adapter), /health, /metrics (Prometheus), /v1/stats (JSON).")
    serve.add_argument("--model", required=True, help="embedded name (smollm2-135m, minilm), model dir or .gguf")
    serve.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter to load at start (repeatable)")
    serve.add_argument("--adapter-dir", help="adapters a request may name (loaded the first time one is asked for) "
                                             "or POST /v1/adapters may load, by plain name")
    serve.add_argument("--max-loaded-adapters", type=int,
                       help="adapters kept in memory; loading one more evicts the least recently used idle one")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--scheduler", default="continuous", choices=["continuous", "static"],
                       help="continuous: requests join and leave the running batch at every decoding step, prompts "
                            "prefilled in chunks between steps; static: a batch runs until its longest row ends")
    serve.add_argument("--workers", default="auto",
                       help="engine workers decoding at once over the one model, each with its share of --max-batch, "
                            "of the KV cache and of the cores; auto (default): 2 where there are 2 cores or more "
                            "(continuous scheduling), else 1; said at start")
    serve.add_argument("--prefill-chunk", type=int, default=256,
                       help="prompt tokens prefilled between two decoding steps (continuous scheduler)")
    serve.add_argument("--max-queue", type=int, default=128, help="waiting requests before 429")
    serve.add_argument("--max-prompt-tokens", type=int, default=1024)
    serve.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask")
    serve.add_argument("--max-body-bytes", type=int, default=256_000)
    serve.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="dtype of the served base; auto (default): bf16 where the CPU has native bf16 matrix units "
                            "(AMX-BF16, AVX512-BF16), fp32 elsewhere; said at start")
    serve.add_argument("--qlora", action="store_true",
                       help="serve the base in 4-bit NF4, read straight into 4 bits (about a quarter of its bf16 "
                            "memory); automatic for adapters trained with --qlora")
    serve.add_argument("--packed-weights", default="auto", choices=["auto", "on", "off"],
                       help="a copy of the fp32 base's linear weights packed for oneDNN, which multiplies the few rows "
                            "of a decoding step faster than torch's default path on some CPUs; auto (default): on for "
                            "an fp32 base when the copy takes under half of the memory available, for the row counts "
                            "where it measured faster (once per machine, kept in the lorakit cache directory's "
                            "packed-weights.json); said at start")
    serve.add_argument("--packed-prefill", default="auto", choices=["auto", "off"],
                       help="prefill the prompts of one forward laid end to end in one row instead of padded to the "
                            "longest (continuous scheduler); auto (default): on when the model's packed forward "
                            "gives its plain forward's logits, checked at start; said at start")
    serve.add_argument("--decode-kernel", default="auto", choices=["auto", "off"],
                       help="decoding steps' attention through lorakit's C++ kernel, each row over its own cached "
                            "columns, instead of SDPA over the padded mask; auto (default): on for an fp32 or bf16 CPU base "
                            "when a C++ compiler builds it (once, about a second) and its logits equal SDPA's; "
                            "said at start")
    serve.add_argument("--lora-kernel", default="auto", choices=["auto", "off"],
                       help="decoding steps over rows of different adapters: each row's LoRA term through lorakit's "
                            "C++ kernel (its own adapter only) instead of two GEMMs over every loaded adapter; auto "
                            "(default): on for an fp32 or bf16 CPU base when a C++ compiler builds it and its sums "
                            "equal torch's; said at start")
    serve.add_argument("--prefix-cache-mb", type=float, default=256,
                       help="memory for keys and values of shared prompt prefixes (chat templates, system prompts), "
                            "reused by later requests with the same adapter; 0 turns it off; hit rate in /metrics")
    serve.add_argument("--kv-cache-mb", type=float, default=1024,
                       help="KV cache allocated at start for --max-batch requests of --max-prompt-tokens + "
                            "--max-tokens-limit tokens, or as much of that as fits (it grows on demand past it)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                         "(default: $LORAKIT_API_KEY)")
    serve.set_defaults(func=_serve)
