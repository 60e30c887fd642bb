"""Check `lorakit estimate`'s memory model against measured training memory.

    python -m benchmarks.estimate_memory [--shapes llama-512x4 llama-768x6 smollm2-135m]

For each model size, a child process builds the random-init Llama in fp32, trains a few AdamW
steps (LoRA r=16 on q,k,v,o, and full fine-tuning), and reports its peak RSS above the RSS it had
before building the model (the Python + torch baseline). The estimate comes from the config alone.
"""

from __future__ import annotations

import argparse
import json
import resource

from .common import llama_config, print_table, run_child

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def child(shape: str, method: str, batch: int, seq: int, rank: int, steps: int) -> dict:
    import torch

    import lorakit as lk

    from .common import build_llama

    torch.set_num_threads(2)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_llama(shape).train()
    if method == "lora":
        lk.inject(model, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-512x4", "llama-768x6", "smollm2-135m"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, method = args.child.split(":")
        print(json.dumps(child(shape, method, args.batch, args.seq, args.rank, args.steps)))
        return
    from lorakit.tools.estimate import estimate

    rows = []
    for shape in args.shapes:
        predicted = {m.method: m.total for m in estimate(llama_config(shape), r=args.rank, targets=TARGETS,
                                                           dtype="fp32", batch_size=args.batch, seq_len=args.seq,
                                                           attention="sdpa").memory}
        for method in ("lora", "full"):
            measured = run_child("benchmarks.estimate_memory", "--child", f"{shape}:{method}", f"--batch={args.batch}",
                                 f"--seq={args.seq}", f"--rank={args.rank}", f"--steps={args.steps}")
            m, p = measured["peak_bytes"], predicted[method]
            rows.append((shape, method, f"{p / 1e6:.0f}", f"{m / 1e6:.0f}", f"{(p - m) / m * 100:+.1f}%"))
    print_table(f"estimated vs measured peak training memory, fp32, AdamW, batch {args.batch}x{args.seq}, "
                f"LoRA r={args.rank} on q,k,v,o", rows, ("model", "method", "estimate MB", "measured MB", "error"))


if __name__ == "__main__":
    main()
