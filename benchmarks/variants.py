"""LoRA variants against PEFT, side by side in one run: PiSSA / OLoRA initialisation time and DoRA
inference overhead (unmerged and merged) over the frozen base.

    python -m benchmarks.variants [--shape llama-768x6] [--rank 16] [--batch 4] [--seq 256] [--repeats 5]

Initialisation: inject r on the seven projections of a random-init Llama (`lk.inject` vs
`peft.get_peft_model`), median of --repeats fresh models each, interleaved. Inference: a no-grad
forward of batch × seq tokens, base model vs DoRA unmerged vs DoRA merged, lorakit and PEFT,
interleaved (benchmarks.common.interleaved); "overhead" = time / base time − 1.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from .common import SEVEN, build_llama, interleaved, print_table


def init_times(shape: str, rank: int, repeats: int) -> list[tuple]:
    import peft

    import lorakit as lk

    base = build_llama(shape)
    methods = ["pissa", "pissa_niter_4", "olora"]
    cases = [(lib, m) for m in methods for lib in ("peft", "lorakit")]
    times = {case: [] for case in cases}
    for repeat in range(repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)
        for lib, method in order:
            model = copy.deepcopy(base)
            fields = dict(r=rank, lora_alpha=2 * rank, target_modules=SEVEN, init_lora_weights=method)
            start = time.perf_counter()
            if lib == "peft":
                peft.get_peft_model(model, peft.LoraConfig(**fields))
            else:
                lk.inject(model, lk.LoraConfig(**fields))
            times[(lib, method)].append(time.perf_counter() - start)
    rows = []
    for method in methods:
        ours, theirs = statistics.median(times[("lorakit", method)]), statistics.median(times[("peft", method)])
        rows.append((method, f"{theirs * 1000:.0f}", f"{ours * 1000:.0f}", f"{ours / theirs:.2f}"))
    return rows


def dora_inference(shape: str, rank: int, batch: int, seq: int, repeats: int) -> list[tuple]:
    import peft

    import lorakit as lk

    base = build_llama(shape)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    fields = dict(r=rank, lora_alpha=2 * rank, target_modules=SEVEN, use_dora=True, init_lora_weights=False)
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**fields))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)).eval()
    ours_merged = lk.merge(lk.inject(copy.deepcopy(base), lk.LoraConfig(**fields)))
    theirs_merged = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)).eval()
    theirs_merged.merge_adapter()

    def forward(model):
        return lambda: model(input_ids=ids, use_cache=False)

    with torch.no_grad():
        t = interleaved({"base": forward(base), "lorakit": forward(ours), "peft": forward(theirs),
                         "lorakit merged": forward(ours_merged), "peft merged": forward(theirs_merged)}, repeats)
    return [(name, f"{t[name] * 1000:.0f}", f"{t[name] / t['base']:.2f}", f"{100 * (t[name] / t['base'] - 1):.0f}%")
            for name in ("base", "peft", "lorakit", "peft merged", "lorakit merged")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-768x6")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_table(f"PiSSA / OLoRA initialisation, {args.shape}, r={args.rank} on 7 projections, median of "
                f"{args.repeats}", init_times(args.shape, args.rank, args.repeats),
                ("init", "peft ms", "lorakit ms", "lorakit / peft"))
    print_table(f"DoRA inference, {args.shape}, batch {args.batch}x{args.seq}, r={args.rank}, no grad, median of "
                f"{args.repeats}", dora_inference(args.shape, args.rank, args.batch, args.seq, args.repeats),
                ("model", "ms", "x base", "overhead"))


if __name__ == "__main__":
    main()
