"""AdaLoRA against LoRA at the same final parameter budget, and where AdaLoRA puts its ranks.

    python -m benchmarks.adalora_study --seeds 0,1,2 [--sft] [--out benchmarks/results/adalora_study.jsonl]

Classify: `lorakit demo`'s training (MiniLM, rotten-tomatoes, 300 steps of batch 32, 64-token
reviews, the default lr and all-linear targets) with `--method adalora --init-r 12 --target-r 8`:
it ends with 8 live triplets per layer on average, the parameter count of LoRA r=8 (plus one λ per
triplet). The LoRA r=8 rows are benchmarks/results/variants_quality.jsonl's (same options, same
seeds). --sft adds SmolLM2-135M-Instruct answering "positive"/"negative" on the same reviews
(100 steps, 100 test reviews), LoRA r=8 and AdaLoRA 12 -> 8, one seed.

Writes one JSON line per run (with the final rank of every layer) and a plot of the mean final rank
per module type to --plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def run(task: str, method: str, seed: int, steps: int, eval_examples: int | None) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    model = "minilm" if task == "classify" else "smollm2-135m"
    # 64 tokens is the demo's review length; SFT rows (chat template + review + answer) need 256, or
    # long reviews lose their answer tokens and the validation loss sees none
    fields = dict(model=model, data="rotten-tomatoes", task=task, max_steps=steps, seq_len=64 if task == "classify"
                  else 256, seed=seed, r=8,
                  overwrite=True, eval_examples=eval_examples)
    if method == "adalora":
        fields.update(method="adalora", init_r=12, target_r=8)
    with tempfile.TemporaryDirectory() as folder:
        summary = train(resolve_options(None, dict(fields, output=folder)))
    metric = "accuracy" if task == "classify" else "answer_accuracy"
    return {"task": task, "method": method, "seed": seed, "steps": steps, "test": round(summary["test"][metric], 4),
            "metric": metric, "trainable_params": summary["trainable_params"],
            "live_params": summary.get("adalora_live_params"), "ranks": summary.get("adalora_ranks"),
            "train_seconds": summary["train_seconds"]}


def by_type(ranks: dict[str, int]) -> dict[str, float]:
    groups: dict[str, list[int]] = {}
    for path, rank in ranks.items():
        kind = ".".join(p for p in path.split(".")[-3:] if not p.isdigit())
        groups.setdefault(kind, []).append(rank)
    return {kind: statistics.mean(values) for kind, values in groups.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ranks"]]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        kinds = by_type(row["ranks"])
        ax.barh(list(kinds), list(kinds.values()), color="tab:blue")
        ax.axvline(8, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{row['task']} seed {row['seed']}", xlabel="mean final rank (init 12, target 8)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sft", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/adalora_study.jsonl")
    parser.add_argument("--plot", default="bench-out/adalora/ranks_by_module_type.png")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    jobs = [("classify", "adalora", int(s), 300, None) for s in args.seeds.split(",")]
    if args.sft:
        jobs += [("sft", "lora", 0, 100, 100), ("sft", "adalora", 0, 100, 100)]
    for task, method, seed, steps, cap in jobs:
        if any(r["task"] == task and r["method"] == method and r["seed"] == seed for r in done):
            continue
        row = run(task, method, seed, steps, cap)
        done.append(row)
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    plot([r for r in done if r["method"] == "adalora"], Path(args.plot))
    for row in done:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in by_type(row["ranks"]).items()) if row["ranks"] else ""
        print(f"{row['task']} {row['method']} seed {row['seed']}: {row['metric']} {row['test']:.4f}, "
              f"trainable {row['trainable_params']:,}, live {row['live_params'] or '-'}  {kinds}")


if __name__ == "__main__":
    main()
