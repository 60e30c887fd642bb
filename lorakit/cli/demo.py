"""The embedded default job: LoRA-fine-tune MiniLM on rotten-tomatoes, evaluate, save, reload, merge.

It is `lorakit train` with its defaults (lr, targets, batch: TASK_DEFAULTS, chosen by the defaults
study) for 300 steps on 64-token reviews, followed by the checks a user would do by hand:
the saved adapter reloads onto a fresh base with the same predictions, and the merged plain
transformers model predicts the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..hub.models import load_model, load_trained
from ..training.data import encode, load_splits
from ..training.evaluation import evaluate
from ..training.inference import merge_run
from ..training.loop import train
from ..training.options import resolve_options


def run_demo(output: str = "lorakit-demo", steps: int = 300, seed: int = 0, eval_examples: int | None = None,
             r: int = 8, alpha: float | None = None, overwrite: bool = True) -> dict:
    options = resolve_options(None, dict(model="minilm", data="rotten-tomatoes", task="classify", output=output,
                                         max_steps=steps, seq_len=64, seed=seed, r=r, alpha=alpha,
                                         eval_examples=eval_examples, overwrite=overwrite))  # else `train`'s defaults
    summary = train(options)
    adapter_dir = Path(summary["artifact"])

    # reload the saved adapter onto a fresh base, and export a merged plain model: same predictions?
    model, tokenizer, record = load_trained(adapter_dir)
    rows = load_splits(options.data, seed)["test"]
    examples = encode(rows[:eval_examples] if eval_examples else rows, tokenizer, "classify", record["seq_len"],
                      "test", labels=record["labels"])
    reloaded = evaluate(model, examples, "classify", tokenizer.pad_token_id, record["labels"])
    merged_dir = merge_run(str(adapter_dir), str(Path(output) / "merged"), overwrite=True)
    merged_model, _ = load_model(str(merged_dir), "classify", record["labels"])
    merged = evaluate(merged_model, examples, "classify", tokenizer.pad_token_id, record["labels"])
    with torch.no_grad():
        batch = tokenizer([e["text"] for e in rows[:64]], truncation=True, max_length=record["seq_len"],
                          padding=True, return_tensors="pt")
        diff = float((model(**batch).logits - merged_model(**batch).logits).abs().max())

    result = {
        "model": "all-MiniLM-L6-v2", "r": r, "lora_alpha": options.lora_alpha, "data": "rotten-tomatoes (split by movie)",
        "train_examples": summary["train_examples"], "test_examples": len(examples), "steps": summary["steps"],
        "best_step": summary["best_step"], "train_seconds": summary["train_seconds"],
        "trainable_params": summary["trainable_params"], "lora_params": summary["lora_params"],
        "total_params": summary["total_params"], "test_accuracy": round(summary["test"]["accuracy"], 4),
        "test_macro_f1": round(summary["test"]["macro_f1"], 4),
        "reloaded_accuracy": round(reloaded["accuracy"], 4), "merged_accuracy": round(merged["accuracy"], 4),
        "max_abs_diff_merged": diff, "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir),
        "adapter_bytes": sum(f.stat().st_size for f in adapter_dir.glob("adapter_*")),
        "loss_curve": summary["loss_curve"], "log": str(Path(output) / "train_log.jsonl"),
    }
    (Path(output) / "demo_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
