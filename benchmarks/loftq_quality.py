"""LoftQ beside plain QLoRA (issue 28): QLoRA SFT on SmolLM2-135M, loss at step 0 and at the end,
test accuracy, 3 seeds; the same run without quantization (fp32 LoRA) as the floor LoftQ aims at.

    python -m benchmarks.loftq_quality [--steps 40] [--seeds 0,1,2] [--eval-examples 100]

Each run: `lorakit train --model smollm2-135m --data rotten-tomatoes --task sft --max-steps STEPS
--seed S` with `--qlora` (default init: Kaiming A, zero B, alpha 2r), `--qlora --init loftq` (A, B
from the SVD of W - NF4(W), alpha r: the defaults a user gets) or neither (fp32). The step-0 loss
is the first logged loss, computed before the first update: the 4-bit model (+ LoftQ's start)
against the full-precision one on the same batch. Results: benchmarks/results/loftq_quality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

VARIANTS = {"qlora": dict(qlora=True), "qlora + loftq": dict(qlora=True, init="loftq"), "lora fp32": {}}


def run(name: str, seed: int, steps: int, eval_examples: int, root: Path) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    output = root / f"{name.replace(' ', '_').replace('+', '')}-{seed}"
    summary = train(resolve_options(None, dict(model="smollm2-135m", data="rotten-tomatoes", task="sft",
                                               output=str(output), max_steps=steps, seed=seed, overwrite=True,
                                               eval_examples=eval_examples, **VARIANTS[name])), quiet=True)
    losses = [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()
              if '"lr"' in line]
    return {"variant": name, "seed": seed, "loss_step0": losses[0], "loss_end": statistics.mean(losses[-5:]),
            "test_accuracy": summary["test"]["answer_accuracy"], "test_loss": summary["test"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--output", default="benchmarks/results/loftq_quality.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in VARIANTS:
                rows.append(run(name, seed, args.steps, args.eval_examples, Path(root)))
                print(json.dumps(rows[-1]), flush=True)
    table = {}
    print(f"\n{'variant':<16} {'loss step 0':>12} {'loss end (last 5)':>18} {'test acc':>9} {'test loss':>10}")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        means = {k: statistics.mean(r[k] for r in mine) for k in ("loss_step0", "loss_end", "test_accuracy", "test_loss")}
        table[name] = means
        print(f"{name:<16} {means['loss_step0']:>12.4f} {means['loss_end']:>18.4f} {means['test_accuracy']:>9.3f} "
              f"{means['test_loss']:>10.4f}")
    fp, plain, loftq = table["lora fp32"], table["qlora"], table["qlora + loftq"]
    gap = {k: (loftq[k] - fp[k], plain[k] - fp[k]) for k in ("loss_step0", "test_loss")}
    print(f"\nstep-0 loss above fp32: qlora {gap['loss_step0'][1]:+.4f}, loftq {gap['loss_step0'][0]:+.4f}")
    Path(args.output).write_text(json.dumps({"command": "python -m benchmarks.loftq_quality " +
                                             f"--steps {args.steps} --seeds {args.seeds} --eval-examples "
                                             f"{args.eval_examples}", "runs": rows, "means": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
