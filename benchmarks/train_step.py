"""Training step time and peak memory: lorakit LoRA vs PEFT LoRA vs full fine-tuning.

    python -m benchmarks.train_step [--shape llama-768x6] [--batch 4] [--seq 256] [--repeats 3]
                                    [--dtypes fp32 bf16] [--dropouts 0 0.05]

bf16 means autocast with a bf16 frozen base and fp32 LoRA weights (PEFT: the model cast to bf16,
its adapters kept in fp32 by PEFT's autocast_adapter_dtype; full fine-tuning: autocast over fp32
weights). "roofline" = useful matmul FLOPs per second / the GEMM throughput of this machine
measured in the same run (a tokens x hidden x intermediate GEMM in that dtype): 4·P·T FLOPs per
LoRA step (forward + input gradient of P matmul weights over T tokens), 6·P·T for full fine-tuning.

Rows: full (full fine-tuning), floor (no LoRA: the frozen base's forward and input gradients, with
lorakit's chunked loss: a lower bound for any LoRA step on this model), peft, lorakit-layers
(lorakit's fused LoRA layers under transformers' loss), lorakit (the layers plus the chunked loss:
what `lorakit train` runs for a causal LM). DoRA rows (--impls peft-dora lorakit-dora): the same
with use_dora=True; lorakit-dora goes through the fused DoRA path (lorakit/kernels/dora.py) and the
chunked loss, and its ratios are taken against peft-dora and against lorakit's own LoRA row.

Each measurement runs in a fresh child process (so peak RSS belongs to one case), the cases
interleaved round-robin in a shuffled order per round. Time is the fastest step of all rounds (the
machine is shared: other load only ever adds time, and whole rounds can be slowed). Peak memory = peak RSS during the steps minus RSS before the first
step (weights and optimizer set-up excluded; activations, gradients and optimizer state counted).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time

from .common import SEVEN, print_table, run_child


def gemm_child(shape: str, batch: int, seq: int, dtype: str, threads: int) -> dict:
    import torch

    from .common import SHAPES

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    hidden, inner = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    a, b = torch.randn(batch * seq, hidden, dtype=dt), torch.randn(hidden, inner, dtype=dt)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"flops_per_s": 2 * batch * seq * hidden * inner / min(times[2:])}


def child(impl: str, shape: str, batch: int, seq: int, rank: int, dropout: float, steps: int, threads: int,
          dtype: str = "fp32") -> dict:
    import torch

    from lorakit.kernels.losses import linear_cross_entropy, shift_labels

    from .common import build_llama

    torch.set_num_threads(threads)
    model = build_llama(shape).train()
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    bf16 = dtype == "bf16"
    dora = impl.endswith("-dora")
    if impl.startswith("lorakit"):
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=SEVEN,
                                       use_dora=dora))
        if bf16:
            lk.cast_base(model, torch.bfloat16)
    elif impl.startswith("peft"):
        import peft

        if bf16:
            model = model.to(torch.bfloat16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                           target_modules=SEVEN, use_dora=dora))
    elif impl == "floor":  # no LoRA at all: the frozen base's forward and input gradients only
        model.requires_grad_(False)
        if bf16:
            model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # the floor trains nothing
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if impl in ("lorakit", "lorakit-dora"):  # lorakit's training step: fused LoRA layers + the chunked loss
                loss = lk.causal_lm_loss(model, ids, ids)
            elif impl == "floor":  # gradients flow from the loss down to the embeddings, as in LoRA
                embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
                hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
                loss = linear_cross_entropy(hidden, model.lm_head.weight, shift_labels(ids))
            else:  # PEFT, full fine-tuning and "lorakit-layers" (the fused layers alone): transformers' loss
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer:
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
    return {"step_s": min(times), "peak_mb": (peak - before) / 1024,
            "trainable": sum(p.numel() for p in params), "flops": (6 if impl == "full" else 4) * matmul_params * batch * seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-768x6")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=["peft", "lorakit-layers", "lorakit"],
                        choices=["peft", "lorakit-layers", "lorakit", "peft-dora", "lorakit-dora"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = [f"--{k}={v}" for k, v in [("shape", args.shape), ("batch", args.batch), ("seq", args.seq),
                                         ("rank", args.rank), ("steps", args.steps), ("threads", args.threads)]]
    if args.child:
        impl, dropout, dtype = args.child.split(":")
        if impl == "gemm":
            print(json.dumps(gemm_child(args.shape, args.batch, args.seq, dtype, args.threads)))
            return
        print(json.dumps(child(impl, args.shape, args.batch, args.seq, args.rank, float(dropout), args.steps,
                               args.threads, dtype)))
        return
    cases = [(impl, d, dt) for dt in args.dtypes for impl, d in
             [("gemm", 0.0), ("full", 0.0), ("floor", 0.0)] + [(impl, d) for d in args.dropouts for impl in args.impls]]
    results: dict = {case: [] for case in cases}
    for repeat in range(args.repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)  # interleaved, in a different order each round
        for impl, dropout, dtype in order:
            results[(impl, dropout, dtype)].append(run_child("benchmarks.train_step", "--child",
                                                             f"{impl}:{dropout}:{dtype}", *common))
    # time: the fastest step over all rounds (on this shared machine noise only ever adds time);
    # memory and the rest: the median over rounds; GEMM throughput: the best round
    best = {"step_s": min, "flops_per_s": max}
    med = {c: {k: best.get(k, statistics.median)([r[k] for r in runs]) for k in runs[0]}
           for c, runs in results.items()}
    rows = []
    for (impl, dropout, dtype), m in med.items():
        if impl == "gemm":
            continue
        full, peak = med[("full", 0.0, dtype)]["step_s"], med[("gemm", 0.0, dtype)]["flops_per_s"]
        floor = med[("floor", 0.0, dtype)]["step_s"]
        peft_m = med.get(("peft-dora" if impl.endswith("-dora") else "peft", dropout, dtype))
        own_lora = med.get(("lorakit", dropout, dtype)) if impl == "lorakit-dora" else None
        ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "n/a"  # noqa: E731
        vs_peft = (ratio(m["step_s"], peft_m["step_s"]), ratio(m["peak_mb"], peft_m["peak_mb"])) \
            if impl.startswith("lorakit") and peft_m else ("", "")
        vs_lora = ratio(m["step_s"], own_lora["step_s"]) if own_lora else ""
        tokens = args.batch * args.seq
        rows.append((impl, dtype, dropout, f"{int(m['trainable']):,}", f"{m['step_s'] * 1000:.0f}",
                     f"{tokens / m['step_s']:.0f}", f"{m['step_s'] / full:.2f}", f"{m['step_s'] / floor:.2f}",
                     f"{m['peak_mb']:.0f}",
                     f"{100 * m['flops'] / m['step_s'] / peak:.0f}%", *vs_peft, vs_lora))
    print_table(f"training step, {args.shape}, batch {args.batch}x{args.seq}, r={args.rank} on 7 projections, "
                f"AdamW, {args.threads} threads, fastest step of {args.repeats} interleaved runs x {args.steps} steps",
                rows, ("impl", "dtype", "dropout", "trainable", "ms/step", "tokens/s", "x full", "x floor", "peak MB",
                       "roofline", "time x peft", "mem x peft", "time x lora"))
    for dtype in args.dtypes:
        print(f"GEMM throughput {dtype}: {med[('gemm', 0.0, dtype)]['flops_per_s'] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
