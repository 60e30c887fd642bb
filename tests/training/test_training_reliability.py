"""Runs that would "succeed" while learning nothing, and bad options: refused or stopped loudly."""

import json
import math

import pytest
from transformers import AutoTokenizer

from lorakit.errors import ConfigError, TrainingDivergedError
from lorakit.training.data import Truncation, answer_tokens, encode
from lorakit.training.learning_check import learning_check
from lorakit.training.loop import train
from lorakit.training.options import resolve_options
from tests.helpers import train_options


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"max_steps": -1}, {"lr": float("inf")}, {"lr": float("nan")},
                                 {"lr": 0.0}, {"lr": -1e-4}, {"head_lr": 0.0}, {"max_grad_norm": float("inf")}])
def test_bad_steps_and_learning_rates_are_refused(bad, classifier_dir, reviews_csv, tmp_path):
    """Before: --max-steps 0 ran a whole epoch, -1 exited 0 after 0 steps, --lr inf saved NaN weights."""
    with pytest.raises(ConfigError) as refused:
        train_options(classifier_dir, reviews_csv, tmp_path / "run", **bad)
    flag = next(iter(bad)).replace("_", "-")
    assert f"--{flag}" in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_before_saving_nan(classifier_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="not finite"):
        train(train_options(classifier_dir, reviews_csv, out, lr=1e30, max_grad_norm=0.0, max_steps=30, eval_steps=30,
                      warmup_steps=0), quiet=True)
    assert not (out / "adapter").exists() and not (out / "checkpoint").exists()
    for line in (out / "train_log.jsonl").read_text().splitlines():  # strict JSON: no NaN / Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


def test_sft_keeps_the_answer_and_cuts_the_prompt_from_the_left(causal_dir):
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    long_prompt = "the film was " * 20 + "really"
    rows = [{"prompt": long_prompt, "response": "good great"}]
    whole = encode(rows, tokenizer, "sft", 1000, "train")[0]
    cut = encode(rows, tokenizer, "sft", 24, "train", truncation=Truncation(24))[0]
    answer = [t for t in whole["labels"] if t != -100]
    assert len(cut["input_ids"]) == 24 and [t for t in cut["labels"] if t != -100] == answer  # answer whole
    assert cut["input_ids"] == whole["input_ids"][-24:]  # what goes is the prompt's start
    assert answer_tokens([cut]) == len(answer)


def test_sft_refuses_a_run_where_no_row_keeps_an_answer_token(causal_dir, sft_jsonl, tmp_path):
    """Before: loss 0.0 on every step, test perplexity 1.0 over 0 tokens, learning check "ok", exit 0."""
    with pytest.raises(ConfigError, match="no training row keeps a token"):
        train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(tmp_path / "r"),
                                         max_steps=2, seq_len=1, batch_size=4)), quiet=True)


def test_the_learning_check_counts_no_target_tokens_as_not_learning(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 0.0}) + "\n" for i in range(20)))
    assert not learning_check("sft", {"loss": 0.0, "perplexity": 1.0, "tokens": 0}, log)["ok"]
    assert not learning_check("sft", None, log)["ok"]  # a loss of zero from the first step learned nothing
    log.write_text("".join(json.dumps({"step": i, "loss": 3.0 - 0.1 * i}) + "\n" for i in range(20)))
    assert learning_check("sft", {"loss": 1.0, "perplexity": math.e, "tokens": 40}, log)["ok"]


def test_a_run_larger_than_the_memory_available_is_refused_before_anything_is_written(causal_dir, sft_jsonl, tmp_path,
                                                                                       monkeypatch):
    """The estimate's total against MemAvailable: refused with both figures and what would fit,
    before the output directory exists."""
    from transformers import AutoConfig

    from lorakit.hub import low_memory
    from lorakit.training.memory import estimated_bytes

    options = train_options(causal_dir, sft_jsonl, tmp_path / "run", task="sft", batch_size=8, seq_len=64)
    config = AutoConfig.from_pretrained(causal_dir)
    needed = estimated_bytes(config, options, 64)
    small = estimated_bytes(config, resolve_options(None, dict(model=causal_dir, data=sft_jsonl, output="x", task="sft",
                                                               batch_size=1, seq_len=64)), 64)
    assert small < needed
    monkeypatch.setattr(low_memory, "available_bytes", lambda: int((small + needed) / 2 / low_memory.HEADROOM))
    with pytest.raises(ConfigError) as refused:
        train(options, quiet=True)
    text = str(refused.value)
    from lorakit.hub.low_memory import human_bytes
    assert f"about {human_bytes(needed)} by `lorakit estimate`" in text and "--batch-size 1 (" in text
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(low_memory, "available_bytes", lambda: 10 * needed)
    train(options.__class__(**{**options.__dict__, "max_steps": 1}), quiet=True)  # fits: runs
