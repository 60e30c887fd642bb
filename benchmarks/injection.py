"""Time to put LoRA into a model: lk.inject vs peft.get_peft_model, side by side.

    python -m benchmarks.injection [--shape smollm2-135m] [--repeats 5]

Each repeat injects into a fresh copy of the same random-init model (the copy is not timed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch

import lorakit as lk

from .common import SEVEN, build_llama, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_llama(args.shape)
    cases = {
        "lorakit inject": lambda m: lk.inject(m, lk.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                               target_modules=SEVEN)),
        "peft get_peft_model": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                                target_modules=SEVEN)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats + 1):  # first round is warm-up
        for name, fn in cases.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            fn(model)
            times[name].append(time.perf_counter() - start)
            del model
    med = {name: statistics.median(values[1:]) for name, values in times.items()}
    ref = med["peft get_peft_model"]
    rows = [(name, f"{sec * 1000:.1f}", f"{sec / ref:.2f}") for name, sec in med.items()]
    print_table(f"injection, {args.shape}, r={args.rank} on 7 projections, medians of {args.repeats}",
                rows, ("case", "ms", "x peft"))


if __name__ == "__main__":
    main()
