"""Shared pieces of the benchmarks: model shapes, interleaved timing, printing."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3 heads) and a larger Llama.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama-1024x12": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                          num_key_value_heads=4, vocab_size=32000),
    "llama-512x4": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=32000),
    "llama-768x6": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                        num_key_value_heads=4, vocab_size=32000),
}


def parse_with_checkout(parser) -> object:
    """``parser``'s arguments plus ``--lorakit PATH``: lorakit is then imported from that checkout, so
    two commits compare on the same machine minutes apart. Call it before anything imports lorakit."""
    parser.add_argument("--lorakit", help="import lorakit from this checkout instead")
    args = parser.parse_args()
    if args.lorakit:
        sys.path.insert(0, args.lorakit)
    return args


def llama_config(shape: str) -> LlamaConfig:
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=512, tie_word_embeddings=False)


def build_llama(shape: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape)).eval()


def interleaved(cases: dict, repeats: int, warmup: int = 1, seed: int = 0, pause: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each case, running the cases round-robin (in a shuffled order
    each round) so that machine noise and order effects hit them all alike. ``pause``: seconds of
    sleep after every call, untimed, for cases that leave the CPU busy after they return (a server
    process that polls for a while after its last request)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for _ in range(repeats):
        random.Random(seed + _).shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            time.sleep(pause)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, rows: list[tuple], headers: tuple) -> None:
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def run_child(module: str, *args: str) -> dict:
    """Run ``python -m module *args`` in a fresh process (so its peak RSS is its own) and return the
    JSON object it prints last."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
