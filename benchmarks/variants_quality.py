"""LoRA variants against plain LoRA on the embedded classify task, same budget and seeds.

    python -m benchmarks.variants_quality --variants lora,dora,pissa,olora,loraplus --seeds 0,1,2 \
        --out benchmarks/results/variants_quality.jsonl

Every run is `lorakit demo`'s training (MiniLM, rotten-tomatoes split by movie, r=8 alpha 16 on
`lorakit train`'s default targets, 300 steps of batch 32, 64-token reviews, the default lr) with one
variant switched on. Results are appended one JSON line per run; runs already in --out are skipped,
so an interrupted study resumes. The table prints mean ± half the range over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "loraplus": {"loraplus_ratio": 16.0},
    # PiSSA / OLoRA put W0's principal part into A and B: the same lr moves the weight far more
    "pissa-lr2e-4": {"init": "pissa", "lr": 2e-4},
    "olora-lr2e-4": {"init": "olora", "lr": 2e-4},
    # LoRA+ trains B at ratio × lr: at the LoRA lr, B's 16x step is too large here
    "loraplus-lr2e-4": {"loraplus_ratio": 16.0, "lr": 2e-4},
}


def run_one(variant: str, seed: int, steps: int) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    with tempfile.TemporaryDirectory() as folder:
        options = resolve_options(None, dict(model="minilm", data="rotten-tomatoes", task="classify", output=folder,
                                             max_steps=steps, seq_len=64, seed=seed, r=8, overwrite=True,
                                             **VARIANTS[variant]))
        summary = train(options)
    return {"variant": variant, "seed": seed, "steps": steps, "test_accuracy": round(summary["test"]["accuracy"], 4),
            "test_macro_f1": round(summary["test"]["macro_f1"], 4), "train_seconds": summary["train_seconds"],
            "trainable_params": summary["trainable_params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="lora,dora,pissa,olora,loraplus")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/variants_quality.jsonl")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: an interrupted study stays balanced
        for variant in args.variants.split(","):
            if any(r["variant"] == variant and r["seed"] == seed and r["steps"] == args.steps for r in done):
                continue
            row = run_one(variant, seed, args.steps)
            done.append(row)
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    print("\n| variant | trainable | accuracy (mean ± half range) | seeds | train s (mean) |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        rows = [r for r in done if r["variant"] == variant and r["steps"] == args.steps]
        if not rows:
            continue
        acc = [r["test_accuracy"] for r in rows]
        spread = (max(acc) - min(acc)) / 2
        print(f"| {variant} | {rows[0]['trainable_params']:,} | {statistics.mean(acc):.4f} ± {spread:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(r['train_seconds'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
