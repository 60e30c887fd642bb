"""How fast can one prompt be prefilled on this CPU? The matrix work's floor against a bare
transformers forward and `lorakit serve` (issue 26's "prompt prefill through the HTTP server").

    python -m benchmarks.prefill_bound [--tokens 400 --rounds 7 --threads 2 --workers 2]

SmolLM2-135M-Instruct in fp32, one prompt of --tokens tokens, side by side in one run (the cases
take turns in a shuffled order each round; medians):
  matrix floor - only the forward's matrix work, on the model's own weights: every projection of
                 every layer as one GEMM over the prompt's rows, causal SDPA per layer, and the LM
                 head for the last token. No norms, RoPE, activations, residual adds, cache writes
                 or Python: what no implementation of this forward can go under on these cores;
  forward      - the model's own transformers forward (logits of the last token, no cache);
  http         - a fresh prompt of the same length through `lorakit serve` (max_tokens 1) on
                 loopback: tokenising, the engine's prefill with its slot cache, HTTP.
Prints tokens/s of each and their ratio to the floor.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.hub.models import load_model
from lorakit.serving import BackgroundServer, Engine, Limits
from lorakit.serving.openmp import release_threads

from .common import interleaved, print_table
from .serving_load import long_prompts, prefill_rate


def matrix_floor(model, tokens: int):
    """A callable doing ``model``'s matrix work for one ``tokens``-token prompt, and nothing else."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    layers = [layer for layer in model.model.layers]
    x = torch.randn(tokens, config.hidden_size)
    h = torch.randn(tokens, config.intermediate_size)
    q = torch.randn(1, heads, tokens, head_dim)
    kv = torch.randn(1, heads, tokens, head_dim)  # keys and values repeated to the query heads, as
    last = torch.randn(1, config.hidden_size)  # transformers' SDPA path does for grouped queries
    head = model.lm_head.weight

    def run() -> None:
        with torch.inference_mode():
            for layer in layers:
                attention, mlp = layer.self_attn, layer.mlp
                for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                                   mlp.gate_proj, mlp.up_proj):
                    F.linear(x, projection.weight)
                F.linear(h, mlp.down_proj.weight)
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True)
            F.linear(last, head)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="the server's engine workers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_bound.json"))
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", "lm")
    model.eval()
    prompts = iter(long_prompts(tokenizer, args.rounds + 2, args.tokens))  # each once: no prefix cache hits
    ids = tokenizer(next(prompts), return_tensors="pt")["input_ids"]
    tokens = ids.shape[1]

    def forward() -> None:
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)

    engine = Engine(copy.deepcopy(model), tokenizer,  # the engine may repack its weights
                    base_name="smollm2-135m", workers=args.workers,
                    limits=Limits(max_prompt_tokens=max(512, tokens + 16), max_new_tokens=8))
    with BackgroundServer(engine) as server:
        def http() -> None:
            release_threads()  # this thread's idle OpenMP team would slow the server's (serving/openmp.py)
            prefill_rate(server.url, "smollm2-135m", tokenizer, [next(prompts)])

        seconds = interleaved({"matrix floor": matrix_floor(model, tokens), "forward": forward, "http": http},
                              repeats=args.rounds)
    engine.close()
    rate = {name: tokens / s for name, s in seconds.items()}
    floor = rate["matrix floor"]
    print_table(f"one {tokens}-token prompt, fp32, {args.threads} threads, median of {args.rounds} rounds",
                [(name, f"{s * 1000:.0f}", f"{rate[name]:.0f}", f"{rate[name] / floor:.2f}")
                 for name, s in seconds.items()], ("case", "ms", "tokens/s", "/ floor"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "tokens": tokens,
                                    "seconds": seconds, "tokens_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
