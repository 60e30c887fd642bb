"""Rank sweeps: train the same job at several ranks (and seeds), tabulate and plot metric vs rank."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from ..errors import ConfigError
from .loop import train
from .options import TrainOptions


def headline_metric(task: str, test: dict | None) -> tuple[str, float | None]:
    if not test:
        return "none", None
    if task == "classify":
        return "accuracy", test["accuracy"]
    if "answer_accuracy" in test:
        return "answer_accuracy", test["answer_accuracy"]
    return "perplexity", test["perplexity"]


def sweep(base: TrainOptions, ranks: list[int], seeds: list[int], quiet: bool = True) -> dict:
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError(f"--ranks needs positive integers, got {ranks}")
    if base.full:
        raise ConfigError("a rank sweep trains LoRA adapters; drop --full")
    root = Path(base.output)
    rows = []
    for r in ranks:
        runs = []
        for seed in seeds:
            options = dataclasses.replace(base, r=r, seed=seed, output=str(root / f"r{r}-seed{seed}"))
            summary = train(options, quiet=quiet)
            name, value = headline_metric(base.task, summary.get("test"))
            runs.append({"seed": seed, "metric": value, "train_seconds": summary["train_seconds"],
                         "output": summary["output"]})
            print(f"r={r} seed={seed}: test {name} {value}", file=sys.stderr)
        values = [run["metric"] for run in runs if run["metric"] is not None]
        rows.append({"r": r, "lora_alpha": base.alpha if base.alpha is not None else 2.0 * r,
                     "trainable_params": summary["trainable_params"], "lora_params": summary["lora_params"],
                     "metric": name, "mean": statistics.fmean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": runs})
    result = {"task": base.task, "model": base.model, "data": base.data, "seeds": seeds, "rows": rows}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(sweep_plot(result, root / "sweep.png"))
    return result


def sweep_plot(result: dict, path: Path) -> Path:
    from ..tools.plots import _pyplot

    plt = _pyplot()
    rows = [row for row in result["rows"] if row["mean"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([row["r"] for row in rows], [row["mean"] for row in rows], yerr=[row["std"] for row in rows],
                marker="o", capsize=3)
    for row in rows:
        ax.annotate(f"{row['trainable_params']:,} params", (row["r"], row["mean"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="LoRA rank r", ylabel=f"test {rows[0]['metric'] if rows else ''}",
           title=f"{result['model']} on {result['data']}: metric vs rank (mean of {len(result['seeds'])} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
