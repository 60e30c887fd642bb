"""Quality of `lorakit train` on the embedded models and data (issue 5's figures).

    python -m benchmarks.training_quality classify   # MiniLM rotten-tomatoes: LoRA r=8 QKVO vs full FT
    python -m benchmarks.training_quality sweep      # MiniLM r = 4 / 8 / 16
    python -m benchmarks.training_quality sft        # SmolLM2 zero-shot vs LoRA SFT (vs QLoRA SFT)
    python -m benchmarks.training_quality lm         # SmolLM2 on hamlet: held-out perplexity before / after

Every run goes through the same entry points as the CLI; results land in bench-out/quality/*.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorakit.training.inference import evaluate_run
from lorakit.training.loop import train
from lorakit.training.options import resolve_options
from lorakit.training.sweep import sweep

from .common import print_table

QKVO = ["query", "key", "value", "attention.output.dense"]
OUT = Path("bench-out/quality")
CLASSIFY = dict(model="minilm", data="rotten-tomatoes", task="classify", max_steps=300, batch_size=32, seq_len=64,
                eval_steps=100, overwrite=True)
SFT = dict(model="smollm2-135m", data="rotten-tomatoes", task="sft", batch_size=8, seq_len=128, lr=1e-3, bf16=True,
           targets="all-linear", r=16, eval_examples=200, eval_steps=1000, warmup_steps=10, overwrite=True)


def classify(steps: int) -> dict:
    runs = {
        "LoRA r=8 QKVO + head": dict(r=8, lr=3e-3, targets=QKVO),
        "full fine-tune lr 5e-5": dict(full=True, lr=5e-5),
        "full fine-tune lr 1e-4": dict(full=True, lr=1e-4),
    }
    results = {}
    for name, extra in runs.items():
        summary = train(resolve_options(None, {**CLASSIFY, "max_steps": steps, **extra,
                                              "output": str(OUT / name.replace(" ", "_").lower())}), quiet=True)
        results[name] = {k: summary[k] for k in ("trainable_params", "train_seconds", "best_step")}
        results[name].update(accuracy=summary["test"]["accuracy"], macro_f1=summary["test"]["macro_f1"])
    print_table(f"rotten-tomatoes test ({steps} steps of batch 32, best of validation every 100 steps)",
                [(k, f"{v['trainable_params']:,}", f"{v['accuracy']:.4f}", f"{v['macro_f1']:.4f}",
                  f"{v['train_seconds']:.0f}") for k, v in results.items()],
                ("method", "trainable", "accuracy", "macro-F1", "train s"))
    lora = results["LoRA r=8 QKVO + head"]["accuracy"]
    full = max(v["accuracy"] for k, v in results.items() if k.startswith("full"))
    print(f"LoRA - best full fine-tune = {100 * (lora - full):+.2f} points")
    return results


def rank_sweep(steps: int, seeds: list[int]) -> dict:
    base = resolve_options(None, {**CLASSIFY, "max_steps": steps, "lr": 3e-3, "targets": QKVO,
                                  "output": str(OUT / "sweep")})
    return sweep(base, [4, 8, 16], seeds, quiet=True)


def sft(steps: int, qlora: bool) -> dict:
    zero = evaluate_run(None, "rotten-tomatoes", "test", model_name="smollm2-135m", task="sft", limit=SFT["eval_examples"])
    results = {"zero-shot": {"answer_accuracy": zero["answer_accuracy"], "loss": zero["loss"],
                             "replies": zero["sample_replies"][:3]}}
    for name, extra in [("LoRA SFT", {})] + ([("QLoRA SFT", {"qlora": True})] if qlora else []):
        out = OUT / name.split()[0].lower()
        summary = train(resolve_options(None, {**SFT, "max_steps": steps, **extra, "output": str(out)}), quiet=True)
        test = summary["test"]
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses = [entry["loss"] for entry in log if "loss" in entry]
        results[name] = {"answer_accuracy": test["answer_accuracy"], "loss": test["loss"],
                         "replies": test["sample_replies"][:3], "train_seconds": summary["train_seconds"],
                         "trainable_params": summary["trainable_params"],
                         "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}
    print_table(f"SmolLM2-135M-Instruct, rotten-tomatoes as chat ({SFT['eval_examples']} test reviews, {steps} steps)",
                [(k, f"{v['answer_accuracy']:.4f}", f"{v['loss']:.4f}", f"{v.get('final_train_loss', float('nan')):.4f}",
                  str(v.get("train_seconds", "-"))) for k, v in results.items()],
                ("model", "answer accuracy", "test answer loss", "train loss (last 20)", "train s"))
    if "QLoRA SFT" in results:
        ratio = results["QLoRA SFT"]["final_train_loss"] / results["LoRA SFT"]["final_train_loss"]
        print(f"QLoRA / bf16 LoRA final training loss = {ratio:.3f} (target within 3%)")
    return results


def lm(steps: int) -> dict:
    before = evaluate_run(None, "hamlet", "test", model_name="smollm2-135m", task="lm")
    summary = train(resolve_options(None, dict(model="smollm2-135m", data="hamlet", task="lm", seq_len=256,
                                               batch_size=4, lr=5e-4, r=16, targets="all-linear", max_steps=steps,
                                               warmup_steps=10, eval_steps=steps // 2, overwrite=True,
                                               output=str(OUT / "hamlet"))), quiet=True)
    results = {"before": before["perplexity"], "after": summary["test"]["perplexity"],
               "train_seconds": summary["train_seconds"], "test_tokens": before["tokens"]}
    print_table("hamlet held-out perplexity (last 10% of the play)",
                [("SmolLM2-135M-Instruct", f"{results['before']:.2f}"), (f"+ LoRA lm, {steps} steps", f"{results['after']:.2f}")],
                ("model", "perplexity"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["classify", "sweep", "sft", "lm"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--qlora", action="store_true", help="add a QLoRA SFT run beside the LoRA one")
    args = parser.parse_args()
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part == "classify":
        result = classify(args.steps or 300)
    elif args.part == "sweep":
        result = rank_sweep(args.steps or 300, [int(s) for s in args.seeds.split(",")])
    elif args.part == "sft":
        result = sft(args.steps or 100, args.qlora)
    else:
        result = lm(args.steps or 60)
    (OUT / f"{args.part}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
