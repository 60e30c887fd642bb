"""How fast can one prompt be prefilled on this CPU? The matrix work's floor against a bare
transformers forward and `lorakit serve` (issue 26's "prompt prefill through the HTTP server").

    python -m benchmarks.prefill_bound [--tokens 400 --rounds 7 --threads 2 --workers auto]
        [--vllm-python ~/.cache/vllm-cpu-venv/bin/python]

SmolLM2-135M-Instruct in fp32, one prompt of --tokens tokens, side by side in one run (the cases
take turns in a shuffled order each round; medians):
  matrix floor - only the forward's matrix work, on the model's own weights: every projection of
                 every layer as one GEMM over the prompt's rows, causal SDPA per layer, and the LM
                 head for the last token, through torch's kernels (MKL's sgemm, flash SDPA). No
                 norms, RoPE, activations, residual adds, cache writes or Python: what an eager
                 forward on torch's kernels cannot go under on these cores;
  forward      - the model's own transformers forward (logits of the last token, no cache);
  lorakit serve - a fresh prompt of the same length through `lorakit serve` (its own process,
                 max_tokens 1) on loopback: tokenising, the engine's prefill with its slot cache, HTTP;
  vLLM compiled - (with --vllm-python) the same through vLLM-CPU's server (its compiled path, no
                 LoRA, serving_vs_vllm.py's settings). Both servers start before the rounds; each
                 idles while the other works, and every case waits 2 s after the one before (vLLM's server
                 polls on one core for ~1 s after a request; idle, it takes 1% of the machine).
Prints tokens/s of each and their ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.hub.models import load_model
from lorakit.serving.openmp import release_threads

from .common import interleaved, print_table
from .serving_load import long_prompts, prefill_rate
from .serving_vs_vllm import VLLM_ENV, start, stop, vllm_command


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
    parser.add_argument("--workers", default="auto", help="lorakit serve --workers")
    parser.add_argument("--vllm-python", help="python of the vLLM-CPU venv: adds vLLM's server as a case")
    parser.add_argument("--port", type=int, default=8092, help="the first of the servers' ports")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_bound.json"))
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", "lm")
    model.eval()
    servers = {"lorakit serve": ([sys.executable, "-m", "lorakit", "serve", "--model", "smollm2-135m", "--dtype",
                                  "fp32", "--workers", args.workers, "--port", str(args.port)], {}, "smollm2-135m")}
    if args.vllm_python:
        servers["vLLM compiled"] = (vllm_command(args.vllm_python, Path(model.name_or_path), args.port + 1, "fp32"),
                                    VLLM_ENV, "base")
    # every prompt once (a repeated one would start from the server's prefix cache)
    prompts = iter(long_prompts(tokenizer, len(servers) * (args.rounds + 1) + 1, args.tokens))
    ids = tokenizer(next(prompts), return_tensors="pt")["input_ids"]
    tokens = ids.shape[1]

    def forward() -> None:
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)

    def through(url: str, name: str):
        def send() -> None:
            release_threads()  # this process's idle OpenMP team would take the cores' turns (serving/openmp.py)
            prefill_rate(url, name, tokenizer, [next(prompts)])
        return send

    cases = {"matrix floor": matrix_floor(model, tokens), "forward": forward}
    running = []
    try:
        for port, (label, (command, env, name)) in enumerate(servers.items(), start=args.port):
            url = f"http://127.0.0.1:{port}"
            running.append(start(command, env, url, Path(tempfile.gettempdir()) / f"prefill_bound_{port}.log"))
            cases[label] = through(url, name)
        # vLLM's engine polls on one core for about a second after each request (measured: the
        # machine 50% busy for 1 s, 6% after), which would slow whichever case came next
        seconds = interleaved(cases, repeats=args.rounds, pause=2.0 if args.vllm_python else 0.0)
    finally:
        for process in running:
            stop(process)
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
