import json
import signal

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.training.loop import Trainer, train
from tests.helpers import train_options


def losses(output):
    entries = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in entries if "loss" in entry]


def test_classify_run_writes_log_curve_adapter_and_learns(classifier_dir, reviews_csv, tmp_path):
    summary = train(train_options(classifier_dir, reviews_csv, tmp_path / "run", max_steps=60, eval_steps=30,
                               lr=1e-2, targets="all-linear", dropout=0.0), quiet=True)
    out = tmp_path / "run"
    assert {"train_log.jsonl", "loss_curve.png", "summary.json", "train_config.yaml", "adapter", "checkpoint"} <= {
        p.name for p in out.iterdir()}
    assert len(losses(out)) == 60 and summary["test"]["accuracy"] > 0.9  # the words give the label away
    assert json.loads((out / "adapter" / "lorakit_run.json").read_text())["labels"] == ["negative", "positive"]
    # the adapter is a PEFT adapter: PEFT loads it onto the same base and predicts the same
    base = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours, _, _ = __import__("lorakit.hub.models", fromlist=["x"]).load_trained(out)
    ids = torch.tensor([[2, 10, 20, 30, 3]])
    torch.testing.assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"optim": "adamw8bit", "lr_scheduler": "cosine"}], ids=["adamw", "adamw8bit"])
def test_resume_after_ctrl_c_gives_the_same_loss_curve(extra, classifier_dir, reviews_csv, tmp_path, monkeypatch):
    """The checkpoint carries the optimizer's state (8-bit moments included) and the schedule."""
    straight = tmp_path / "straight"
    train(train_options(classifier_dir, reviews_csv, straight, max_steps=10, eval_steps=4, **extra), quiet=True)

    broken = tmp_path / "broken"
    original = Trainer.micro_batch

    def interrupt_at_step_5(self, micro):
        if micro == 5:  # a real SIGINT, delivered during step 6 as if the user pressed Ctrl-C
            signal.raise_signal(signal.SIGINT)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_at_step_5)
    result = train(train_options(classifier_dir, reviews_csv, broken, max_steps=10, eval_steps=4, **extra), quiet=True)
    assert result["interrupted"] and result["step"] == 6 and not (broken / "adapter").exists()
    monkeypatch.setattr(Trainer, "micro_batch", original)
    resumed = train(train_options(classifier_dir, reviews_csv, broken, max_steps=10, eval_steps=4, resume=True, **extra),
                    quiet=True)
    assert losses(broken) == losses(straight)
    assert resumed["best_step"] == json.loads((straight / "summary.json").read_text())["best_step"]
    a = lk.read_adapter(straight / "adapter")[1]
    b = lk.read_adapter(broken / "adapter")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_plan(classifier_dir, reviews_csv, tmp_path):
    train(train_options(classifier_dir, reviews_csv, tmp_path / "r", max_steps=4), quiet=True)
    with pytest.raises(ConfigError, match="checkpoint was made for 4 steps"):
        train(train_options(classifier_dir, reviews_csv, tmp_path / "r", max_steps=8, resume=True), quiet=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(train_options(classifier_dir, reviews_csv, tmp_path / "fresh", resume=True), quiet=True)


def test_output_directory_must_be_empty_unless_overwrite(classifier_dir, reviews_csv, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        train(train_options(classifier_dir, reviews_csv, tmp_path / "used"), quiet=True)
    assert train(train_options(classifier_dir, reviews_csv, tmp_path / "used", overwrite=True), quiet=True)["steps"] == 6


def test_early_stopping_and_best_checkpoint(classifier_dir, reviews_csv, tmp_path):
    summary = train(train_options(classifier_dir, reviews_csv, tmp_path / "es", max_steps=60, eval_steps=2, lr=1e-12,
                            warmup_steps=0, early_stopping_patience=2), quiet=True)
    assert summary["steps"] == 6 and summary["best_step"] == 2  # lr ~0: nothing improves after the first eval


def test_full_fine_tune_saves_a_plain_model(classifier_dir, reviews_csv, tmp_path):
    summary = train(train_options(classifier_dir, reviews_csv, tmp_path / "full", full=True), quiet=True)
    assert summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_causal_lm_steps_go_through_the_chunked_loss(causal_dir, classifier_dir, text_file, reviews_csv, tmp_path):
    lm = Trainer(train_options(causal_dir, text_file, tmp_path / "lm", task="lm", seq_len=16, batch_size=4), quiet=True)
    assert isinstance(lm.wrapped, lk.ChunkedLossLM) and lm.wrapped.model is lm.model
    classify = Trainer(train_options(classifier_dir, reviews_csv, tmp_path / "rt"), quiet=True)
    assert classify.wrapped is classify.model


def test_sft_and_lm_runs(causal_dir, sft_jsonl, text_file, tmp_path):
    sft = train(train_options(causal_dir, sft_jsonl, tmp_path / "sft", task="sft", max_steps=30, lr=2e-2), quiet=True)
    assert sft["test"]["answer_accuracy"] is not None and sft["test"]["loss"] < losses(tmp_path / "sft")[0]
    lm = train(train_options(causal_dir, text_file, tmp_path / "lm", task="lm", max_steps=10, seq_len=16, batch_size=4,
                       targets=["q_proj", "v_proj"]), quiet=True)
    assert lm["test"]["perplexity"] > 1 and lm["lora_params"] == 2 * 2 * 8 * (32 + 32) - 2 * 8 * 16
    merged_ok = AutoModelForCausalLM.from_pretrained(causal_dir)
    assert merged_ok.config.vocab_size > 0


def test_bf16_base_trains_fp32_adapters(classifier_dir, reviews_csv, tmp_path):
    trainer = Trainer(train_options(classifier_dir, reviews_csv, tmp_path / "bf16", bf16=True), quiet=True)
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    summary = trainer.run()
    assert summary["steps"] == 6 and all(l == l for l in losses(tmp_path / "bf16"))


@pytest.mark.parametrize("unit", [None, "avx512_bf16"])
def test_bf16_on_a_cpu_without_a_bf16_unit_says_it_saves_memory_not_time(unit, classifier_dir, reviews_csv, tmp_path,
                                                                         monkeypatch, recwarn):
    monkeypatch.setattr("lorakit.training.setup.native_bf16", lambda: unit)
    Trainer(train_options(classifier_dir, reviews_csv, tmp_path / "bf16", bf16=True), quiet=True)
    said = [str(w.message) for w in recwarn if "bf16 unit" in str(w.message)]
    assert said == ([] if unit else [said[0]]) and (unit or "saves memory, not time" in said[0])


def test_too_little_data_for_one_step(classifier_dir, reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match="fewer than one step"):
        train(train_options(classifier_dir, reviews_csv, tmp_path / "x", batch_size=200), quiet=True)


def test_qlora_run_trains_on_a_4bit_base_and_evaluates_on_it(causal_dir, sft_jsonl, tmp_path):
    summary = train(train_options(causal_dir, sft_jsonl, tmp_path / "q", task="sft", qlora=True, max_steps=4), quiet=True)
    assert summary["method"] == "qlora"
    model, _, record = __import__("lorakit.hub.models", fromlist=["x"]).load_trained(tmp_path / "q")
    assert record["qlora"] and any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_a_qlora_bf16_run_generates_and_a_base_generates_in_bf16(causal_dir, sft_jsonl, tmp_path):
    """A bf16-compute 4-bit base next to fp32 embeddings (as it trained) generates under autocast;
    without it the two dtypes meet in attention. ``dtype`` loads a plain base in bf16."""
    from lorakit.training.inference import generate, load_for_eval
    train(train_options(causal_dir, sft_jsonl, tmp_path / "q", task="sft", qlora=True, bf16=True, max_steps=2),
          quiet=True)
    model, tokenizer, record = load_for_eval(str(tmp_path / "q"), None, None, None)
    assert isinstance(generate(model, tokenizer, ["the film"], record, max_new_tokens=3)[0], str)
    model, tokenizer, record = load_for_eval(None, causal_dir, "lm", None, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert isinstance(generate(model, tokenizer, ["the film"], record, max_new_tokens=3)[0], str)
