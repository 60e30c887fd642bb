"""Did a run learn? The check behind the loud WARNING a run that did not learn ends with."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def learning_check(task: str, test: dict | None, log_path: Path) -> dict:
    """Did the run learn? A classifier must beat the majority class of its test split and not
    predict one label for every row; a language model's training loss must have come down."""
    if task == "classify" and test and "confusion_matrix" in test:
        confusion = torch.tensor(test["confusion_matrix"], dtype=torch.float64)
        majority = float(confusion.sum(1).max() / confusion.sum().clamp(min=1))
        predicted = int((confusion.sum(0) > 0).sum())
        if predicted <= 1 or test["accuracy"] <= majority + 0.01:
            return {"ok": False, "majority_class": majority, "message": (
                f"this run did not learn: test accuracy {test['accuracy']:.3f} vs {majority:.3f} for always "
                f"answering the majority class{' (it predicts one label for every row)' if predicted <= 1 else ''}. "
                "Try a higher --lr, more --epochs / --min-steps, or more --targets.")}
        return {"ok": True, "majority_class": majority}
    if test is not None and test.get("tokens") == 0:
        return {"ok": False, "message": (
            "this run did not learn: its test split has no target tokens (every answer was empty or cut away), so "
            "its loss and perplexity mean nothing. Raise --seq-len or check the answer column.")}
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    if task == "grpo":  # its loss hovers near 0 by construction: the reward must rise
        rewards = [r["reward"] for r in records if "reward" in r]
        if len(rewards) >= 10:
            window = max(1, len(rewards) // 10)
            first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
            if last <= first:
                return {"ok": False, "first_reward": first, "last_reward": last, "message": (
                    f"this run did not learn: the mean reward went from {first:.4f} to {last:.4f}. Try a higher --lr, "
                    "more steps, more --num-generations, or check that the rewards can tell completions apart.")}
            return {"ok": True, "first_reward": first, "last_reward": last}
        return {"ok": True}
    losses = [r.get("loss") for r in records]
    losses = [v for v in losses if v is not None]
    if len(losses) >= 10:
        window = max(1, len(losses) // 10)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        if last > 0.98 * first or first == 0:
            return {"ok": False, "first_loss": first, "last_loss": last, "message": (
                f"this run did not learn: the training loss went from {first:.4f} to {last:.4f}. Try a higher "
                "--lr or more steps.")}
        return {"ok": True, "first_loss": first, "last_loss": last}
    return {"ok": True}
