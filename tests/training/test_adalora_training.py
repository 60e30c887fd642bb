"""`lorakit train --method adalora`: the allocator runs inside the loop and the saved adapter is PEFT's."""

import json

import peft
from transformers import AutoModelForCausalLM

from lorakit.cli import main


def test_train_adalora_end_to_end(causal_dir, sft_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", causal_dir, "--data", sft_jsonl, "--task", "sft", "--output", str(out),
                 "--max-steps", "12", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1",
                 "--method", "adalora", "--init-r", "4", "--target-r", "2", "--targets", "q_proj,v_proj", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out[captured.out.index("{"):])
    ranks = summary["adalora_ranks"]
    assert sum(ranks.values()) == 2 * len(ranks) == 8  # the target budget: 2 per layer on average
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 12 and config["tinit"] == 1
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_dir), out / "adapter")


def test_adalora_bad_flags_fail_before_training(causal_dir, sft_jsonl, tmp_path, capsys):
    code = main(["train", "--model", causal_dir, "--data", sft_jsonl, "--task", "sft", "--output", str(tmp_path / "r"),
                 "--method", "adalora", "--init-r", "4", "--target-r", "8"])
    assert code == 2 and "--target-r must be in 1..--init-r (4), got 8" in capsys.readouterr().err
    code = main(["train", "--model", causal_dir, "--data", sft_jsonl, "--task", "sft", "--output", str(tmp_path / "r"),
                 "--method", "adalora", "--max-steps", "10", "--tinit", "8", "--tfinal", "4"])
    message = capsys.readouterr().err
    assert code == 2 and "no budgeting phase: --tinit (8) must be below --max-steps − --tfinal (10 − 4)" in message
    assert not (tmp_path / "r").exists()  # refused before anything was written
