"""`lorakit train --add-tokens / --trainable-tokens`: the tokenizer grows, the embedding is resized,
only the chosen rows train besides the adapter, and the run loads back (lorakit and PEFT)."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import ConfigError
from lorakit.hub.models import load_trained
from lorakit.training.loop import train
from lorakit.training.options import resolve_options
from tests.helpers import run_cli

NEW = ["<|tool|>", "<|end_tool|>"]


def _options(causal_dir, data, output, **extra):
    return resolve_options(None, dict(model=causal_dir, data=data, task="sft", output=str(output), max_steps=4,
                                      batch_size=4, seq_len=32, warmup_steps=1, lr=5e-2, **extra))


@pytest.mark.slow
def test_added_tokens_train_their_rows_and_load_back(causal_dir, sft_jsonl, tmp_path):
    train(_options(causal_dir, sft_jsonl, tmp_path / "run", add_tokens=NEW, trainable_tokens=["<|im_end|>"]),
          quiet=True)
    adapter = tmp_path / "run" / "adapter"
    base_tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert len(tokenizer) == len(base_tokenizer) + 2
    new_ids = tokenizer.convert_tokens_to_ids(NEW)
    ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), *new_ids]
    config = json.loads((adapter / "adapter_config.json").read_text())
    # this base has its own output head (untied): the new tokens' head rows train too
    assert config["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}
    rows = load_file(adapter / "adapter_model.safetensors")
    trained = rows["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert trained.shape == (3, AutoModelForCausalLM.from_pretrained(causal_dir).config.hidden_size)

    model, loaded_tokenizer, _ = load_trained(tmp_path / "run")
    assert len(loaded_tokenizer) == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(model.get_input_embeddings().trainable_tokens_delta["default"], trained)
    # <|im_end|> (an existing token) moved away from the base's row: it really trained
    base = AutoModelForCausalLM.from_pretrained(causal_dir)
    assert not torch.allclose(trained[0], base.get_input_embeddings().weight[ids[0]])

    # PEFT loads the run's adapter onto the base resized as the run's tokenizer says
    base.resize_token_embeddings(len(tokenizer))
    reference = peft.PeftModel.from_pretrained(base, adapter).eval()
    batch = torch.tensor([[ids[1], 5, ids[2], ids[0], 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, reference(batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (dict(trainable_tokens=["<|nope|>"]), "is not a token of this tokenizer"),
    (dict(trainable_tokens=["99999"]), "outside the vocabulary"),
    (dict(add_tokens=["<|im_end|>"]), "already in the vocabulary"),
])
def test_bad_tokens_are_refused_before_training(causal_dir, sft_jsonl, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(_options(causal_dir, sft_jsonl, tmp_path / "run", **extra), quiet=True)
    assert not (tmp_path / "run" / "adapter").exists()


def test_token_flags_are_checked_with_the_options(causal_dir, sft_jsonl, capsys, tmp_path):
    with pytest.raises(ConfigError, match="classify runs train a head"):
        resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="classify", add_tokens=NEW))
    code, _, err = run_cli(capsys, "train", "--model", causal_dir, "--data", sft_jsonl, "--task", "sft",
                           "--trainable-tokens", "<|im_end|>,<|nope|>", "--output", tmp_path / "cli")
    assert code != 0 and "'<|nope|>' is not a token" in err
