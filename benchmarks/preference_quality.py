"""Does preference / RL training improve the model? DPO from an SFT adapter, GRPO from the base.

    python -m benchmarks.preference_quality [--out /tmp/lorakit-pref] [--part sft dpo grpo]
                                            [--grpo-steps 150] [--grpo-lr 1e-4]

Task: rotten-tomatoes sentiment, SmolLM2-135M-Instruct, bf16 (frozen base in bf16, LoRA in fp32),
r=16 all-linear. Reviews under 600 characters, half of each label (short reviews lean negative),
shuffled; up to train 800 / validation 64 / test 200 of the embedded splits (split by movie; the
test rows were used by no tuning, here or in the defaults).

- SFT (`--task sft`, the defaults study's recipe: lr 1e-3, batch 8, 120 steps) gives the start.
- DPO (`--task dpo --adapter SFT/adapter`: its frozen copy is the reference) on pairs: the right
  label chosen, the other rejected; defaults (beta 0.1, lr 5e-5, batch 8), 100 steps.
- GRPO from the base model (no adapter) on the prompts, reward answer_match: the first
  "positive" / "negative" in the reply equals the label (the SFT table's lenient measure).

Measured on the test split: preference accuracy (the policy gives the chosen answer the higher
log-probability), greedy answer accuracy (up to 8 tokens, lenient), and the GRPO reward of a
greedy reply, before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ANSWER = r"(?i)\b(positive|negative)\b"
MODEL = "smollm2-135m"


def build_data(root: Path) -> dict[str, Path]:
    from lorakit.training.data import RT_PROMPT, load_splits
    from lorakit.training.objectives.data import embedded_rows

    splits = load_splits("rotten-tomatoes", 0)
    sizes = {"train": 800, "validation": 64, "test": 200}
    short = {}
    for name, size in sizes.items():  # short reviews lean negative: take as many of each label, shuffled
        rows = [r for r in splits[name] if len(r["text"]) < 600]
        by_label = [[r for r in rows if r["label"] == label][:size // 2] for label in ("negative", "positive")]
        mixed = by_label[0] + by_label[1]
        random.Random(0).shuffle(mixed)
        short[name] = mixed
    dirs = {}
    for layout in ("sft", "dpo", "grpo"):
        directory = root / f"data-{layout}"
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in short.items():
            if layout == "sft":
                out = [{"prompt": RT_PROMPT.format(text=r["text"]), "response": r["label"]} for r in rows]
            else:
                out = embedded_rows(layout, rows)
            (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
        dirs[layout] = directory
    return dirs


def train(*argv) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", *map(str, argv), "--json", "--overwrite"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    summary = json.loads(out.stdout)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def measure(adapter: Path | None, data: dict[str, Path]) -> dict:
    """Preference accuracy, greedy answer accuracy and GRPO reward on the test split."""
    import types
    import warnings

    import torch

    import lorakit as lk
    from lorakit.hub.models import load_model
    from lorakit.serving.engine import Engine
    from lorakit.serving.requests import Limits
    from lorakit.training.objectives import objective_for
    from lorakit.training.objectives.base import TokenLogProbLM
    from lorakit.training.options import resolve_options

    model, tokenizer = load_model(MODEL, "sft")
    if adapter is not None:
        lk.load_adapter(model, adapter)
        lk.cast_base(model, torch.bfloat16)
    else:
        model.to(torch.bfloat16)
    model.eval()
    runner = TokenLogProbLM(model)
    dist = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, to_device=lambda b: b,
                                 sum=lambda v: v)
    trainer = types.SimpleNamespace(model=model, wrapped=runner, runner_module=runner, dist=dist, step=0)
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = resolve_options(None, dict(task="dpo", model=MODEL, data="x", output="x", bf16=True, seq_len=256))
        grpo = resolve_options(None, dict(task="grpo", model=MODEL, data="x", output="x", bf16=True, seq_len=256,
                                          max_completion_length=8, answer_pattern=ANSWER))
    read = lambda layout: [json.loads(line) for line in (data[layout] / "test.jsonl").read_text().splitlines()]  # noqa: E731
    with torch.no_grad():
        objective = objective_for(pairs, tokenizer, 256)
        examples = objective.encode(read("dpo"), "test")
        # the policy alone ranks the pair (no reference: "does the model prefer the right answer")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wins = []
            for start in range(0, len(examples), 16):
                chunk = examples[start:start + 16]
                batch = objective.batch(trainer, chunk)
                sums = torch.zeros(2 * len(chunk)).index_add(0, batch["segment"], objective.logps(trainer, batch, False))
                wins += (sums[:len(chunk)] > sums[len(chunk):]).tolist()
        result["preference_accuracy"] = sum(wins) / len(wins)
        rollout = objective_for(grpo, tokenizer, 256)
        prompts = rollout.encode(read("grpo"), "test")
        rollout.engine = Engine(model, tokenizer, limits=Limits(max_prompt_tokens=256, max_new_tokens=8, max_batch=64,
                                                                max_queue=1 << 20))
        try:
            metrics = rollout.evaluate(trainer, prompts)
        finally:
            rollout.engine.close()
        result["answer_accuracy"] = metrics["rewards/answer_match"]
        result["reward"] = metrics["reward"]
        result["examples"] = len(examples)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lorakit-pref")
    parser.add_argument("--part", nargs="+", default=["sft", "dpo", "grpo"])
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--dpo-steps", type=int, default=100)
    args = parser.parse_args()
    root = Path(args.out)
    data = build_data(root)
    common = ["--model", MODEL, "--bf16", "--r", "16", "--seq-len", "256", "--eval-examples", "64"]
    report = json.loads((root / "report.json").read_text()) if (root / "report.json").is_file() else {}
    if "sft" in args.part:
        if not (root / "sft" / "adapter").is_dir():  # a finished SFT run is reused
            report["sft_run"] = train("--task", "sft", "--data", data["sft"], "--output", root / "sft", "--max-steps", "120",
                                      "--batch-size", "8", *common)
        report.setdefault("sft_run", json.loads((root / "sft" / "summary.json").read_text()))
        report["sft"] = measure(root / "sft" / "adapter", data)
        report["base"] = measure(None, data)
    if "dpo" in args.part:
        report["dpo_run"] = train("--task", "dpo", "--data", data["dpo"], "--output", root / "dpo", "--adapter",
                                  root / "sft" / "adapter", "--max-steps", str(args.dpo_steps), "--eval-steps", "25",
                                  *common)
        report["dpo"] = measure(root / "dpo" / "adapter", data)
    if "grpo" in args.part:
        report["grpo_run"] = train("--task", "grpo", "--data", data["grpo"], "--output", root / "grpo",
                                   "--max-steps", str(args.grpo_steps), "--eval-steps", "50", "--batch-size", "4",
                                   "--num-generations", "4", "--max-completion-length", "8", "--answer-pattern", ANSWER,
                                   "--lr", str(args.grpo_lr), *common)
        report["grpo"] = measure(root / "grpo" / "adapter", data)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    for name in ("base", "sft", "dpo", "grpo"):
        if name in report:
            m = report[name]
            wall = report.get(f"{name}_run", {}).get("wall_s", "-")
            print(f"{name:>5}: preference accuracy {m['preference_accuracy']:.3f}, answer accuracy "
                  f"{m['answer_accuracy']:.3f}, reward {m['reward']:.3f}  (train wall {wall} s)")
    if "grpo" in report:
        print(f"reward curve: {root / 'grpo' / 'loss_curve.png'}")


if __name__ == "__main__":
    main()
