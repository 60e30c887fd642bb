"""Training step time and peak memory: lorakit LoRA vs PEFT LoRA vs full fine-tuning.

    python -m benchmarks.train_step [--shape llama-768x6] [--batch 4] [--seq 128] [--repeats 3]

Each measurement runs in a fresh child process (so peak RSS belongs to one case), the cases
interleaved round-robin. Peak memory = peak RSS during the steps minus RSS before the first
step (weights and optimizer set-up excluded; activations, gradients and optimizer state counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from .common import SEVEN, print_table, run_child


def child(impl: str, shape: str, batch: int, seq: int, rank: int, dropout: float, steps: int, threads: int) -> dict:
    import torch

    from .common import build_llama

    torch.set_num_threads(threads)
    model = build_llama(shape).train()
    if impl == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=SEVEN))
    elif impl == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                           target_modules=SEVEN))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up; creates the optimizer state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": statistics.median(times), "peak_mb": (peak - before) / 1024,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-768x6")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, dropout = args.child.split(":")
        print(json.dumps(child(impl, args.shape, args.batch, args.seq, args.rank, float(dropout), args.steps,
                               args.threads)))
        return
    cases = [("full", 0.0)] + [(impl, d) for d in args.dropouts for impl in ("peft", "lorakit")]
    results: dict = {case: [] for case in cases}
    for _ in range(args.repeats):
        for impl, dropout in cases:
            results[(impl, dropout)].append(run_child(
                "benchmarks.train_step", "--child", f"{impl}:{dropout}",
                *(f"--{k}={v}" for k, v in [("shape", args.shape), ("batch", args.batch), ("seq", args.seq),
                                             ("rank", args.rank), ("steps", args.steps), ("threads", args.threads)])))
    med = {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for c, runs in results.items()}
    full = med[("full", 0.0)]["step_s"]
    rows = []
    for (impl, dropout), m in med.items():
        peft_m = med.get(("peft", dropout))
        vs_peft = (f"{m['step_s'] / peft_m['step_s']:.2f}", f"{m['peak_mb'] / peft_m['peak_mb']:.2f}") \
            if impl == "lorakit" else ("", "")
        rows.append((impl, dropout, f"{int(m['trainable']):,}", f"{m['step_s'] * 1000:.0f}",
                     f"{m['step_s'] / full:.2f}", f"{m['peak_mb']:.0f}", *vs_peft))
    print_table(f"training step, {args.shape}, batch {args.batch}x{args.seq}, r={args.rank} on 7 projections, "
                f"AdamW, {args.threads} threads, medians of {args.repeats} interleaved runs x {args.steps} steps",
                rows, ("impl", "dropout", "trainable", "ms/step", "x full", "peak MB", "time x peft", "mem x peft"))


if __name__ == "__main__":
    main()
