"""Metrics: accuracy, macro-F1 and a confusion matrix for classify; loss and perplexity for sft/lm;
answer accuracy for sft sets whose answers are a few labels (e.g. "positive"/"negative")."""

from __future__ import annotations

import math
import re

import torch

from .data import collate, prompt_text, sft_pairs


def _batches(examples, size):
    for start in range(0, len(examples), size):
        yield examples[start:start + size]


def _autocast(model, bf16: bool):
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def classification_metrics(predictions: list[int], targets: list[int], labels: list[str]) -> dict:
    n = len(labels)
    confusion = torch.zeros((n, n), dtype=torch.long)  # rows: true label, columns: predicted
    for p, t in zip(predictions, targets):
        confusion[t, p] += 1
    f1s = []
    for k in range(n):
        tp = int(confusion[k, k])
        precision_den, recall_den = int(confusion[:, k].sum()), int(confusion[k].sum())
        if recall_den == 0:
            continue  # a label absent from the targets does not count towards macro-F1
        precision = tp / precision_den if precision_den else 0.0
        recall = tp / recall_den
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"accuracy": float(confusion.diag().sum()) / max(1, len(targets)),
            "macro_f1": sum(f1s) / max(1, len(f1s)), "confusion_matrix": confusion.tolist(), "labels": labels,
            "examples": len(targets)}


@torch.no_grad()
def evaluate(model, examples: list[dict], task: str, pad_id: int, labels: list[str] | None = None,
             batch_size: int = 32, bf16: bool = False) -> dict:
    """Metrics of `model` on encoded examples; the model is left in eval mode."""
    model.eval()
    if task == "classify":
        predictions, targets = [], []
        for chunk in _batches(examples, batch_size):
            batch = collate(chunk, pad_id)
            with _autocast(model, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predictions += logits.argmax(-1).tolist()
            targets += batch["labels"].tolist()
        return classification_metrics(predictions, targets, labels or [])
    total_loss, total_tokens = 0.0, 0
    for chunk in _batches(examples, batch_size):
        batch = collate(chunk, pad_id)
        with _autocast(model, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # next-token loss summed over answer tokens, so batches of unequal length weigh correctly
        shifted = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted,
                                                 ignore_index=-100, reduction="sum")
        total_loss += float(loss)
        total_tokens += int((shifted != -100).sum())
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": total_tokens, "examples": len(examples)}


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@torch.no_grad()
def answer_accuracy(model, tokenizer, rows: list[dict], prompt_template=None, response_template=None,
                    max_new_tokens: int = 8, batch_size: int = 16, bf16: bool = False) -> dict | None:
    """For sft sets with a handful of distinct answers: generate greedily and score the first of the
    candidate answers that appears in the reply (so "The review is positive." counts as "positive").
    Returns None when the answers are free text."""
    pairs = sft_pairs(rows, "evaluation", prompt_template, response_template)
    candidates = sorted({_words(answer) for _, answer in pairs})
    if not pairs or len(candidates) > 20 or any(len(c.split()) > 3 for c in candidates):
        return None
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    correct, replies = 0, []
    try:
        for chunk in _batches(pairs, batch_size):
            prompts = [prompt_text(tokenizer, messages) for messages, _ in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with _autocast(model, bf16):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for (_, answer), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                reply = _words(tokenizer.decode(ids, skip_special_tokens=True))
                hits = [(m.start(), c) for c in candidates for m in [re.search(rf"\b{re.escape(c)}\b", reply)] if m]
                chosen = min(hits)[1] if hits else None
                correct += int(chosen == _words(answer))
                replies.append(reply)
    finally:
        tokenizer.padding_side = side
    return {"answer_accuracy": correct / len(pairs), "examples": len(pairs), "candidates": candidates,
            "sample_replies": replies[:5]}


def split_metrics(model, tokenizer, task: str, examples: list[dict], rows: list[dict], labels, templates,
                  batch_size: int = 32, bf16: bool = False) -> dict:
    """evaluate(), plus answer accuracy for sft sets whose answers are a few labels."""
    metrics = evaluate(model, examples, task, tokenizer.pad_token_id, labels, batch_size, bf16)
    if task == "sft":
        answers = answer_accuracy(model, tokenizer, rows, *templates, bf16=bf16)
        if answers:
            metrics.update(answers)
    return metrics
