"""The fp32 linear products of one SmolLM2-135M layer through torch's two CPU paths and vLLM's (issue 26).

    ~/.cache/vllm-cpu-venv/bin/python benchmarks/gemm_vs_vllm.py [--rows 1,8,16,64,400,1000 --threads 2 --rounds 31]

Run with the python of the vLLM-CPU venv (../shared/anchors/vllm-cpu.md): it needs torch and vLLM's
compiled ops, nothing of lorakit. For each row count (tokens in the forward) one layer's seven
projections (q, k, v, o, gate, up, down: 576 → 576, 192, 192, 576, 1536, 1536 and 1536 → 576),
random weights; the three paths take turns, a layer each, for --rounds rounds; medians:
  torch F.linear      - what a transformers forward runs (MKL's sgemm);
  torch oneDNN packed - torch's bundled oneDNN with the weight reordered (``torch.ops.mkldnn``,
                        lorakit's --packed-weights for small batches);
  vLLM onednn_mm      - vLLM-CPU's own oneDNN matmul with its prepacked weight, what its linear
                        layers run on an x86 CPU without zentorch.
Prints ms per layer and each path's speed-up over F.linear.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def layer_ms(paths: dict, rounds: int) -> dict[str, float]:
    """Median ms of one call of each path, the paths taking turns within every round (this machine's
    speed drifts by 10-20% over minutes; measured one after another, the ranking flipped between runs)."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,64,400,1000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    from vllm import _custom_ops as ops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(fan_out, fan_in) for fan_in, fan_out in LAYER]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    handlers = [ops.create_onednn_mm(w.t(), 32) for w in weights]  # as vLLM's dispatch_cpu_unquantized_gemm
    print(f"torch {torch.__version__}, {args.threads} threads: ms per layer (7 products)")
    print("rows  F.linear  oneDNN packed  vLLM onednn_mm  packed / F.linear  vLLM / F.linear")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(rows, fan_in) for fan_in, _ in LAYER]
            ms = layer_ms({
                "plain": lambda: [F.linear(x, w) for x, w in zip(inputs, weights)],
                "ours": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                 for x, p in zip(inputs, packed)],
                "theirs": lambda: [ops.onednn_mm(h, x, None) for x, h in zip(inputs, handlers)],
            }, args.rounds)
            plain, ours, theirs = ms["plain"], ms["ours"], ms["theirs"]
            print(f"{rows:>4}  {plain:8.2f}  {ours:13.2f}  {theirs:14.2f}  {plain / ours:17.2f}  {plain / theirs:15.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
