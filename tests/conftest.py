"""Fixtures shared by every test: token ids, tiny models saved on disk, small data files. Builders
and other helpers are in helpers.py."""

import csv
import json
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from tests.helpers import CHATML, VOCAB, _word_tokenizer, review_rows

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*target_modules entries matched no module.*")


@pytest.fixture(autouse=True, scope="session")
def packed_calibration_file(tmp_path_factory):
    """The suite keeps its packed-weight calibrations (serving/packed_calibration.py) in a file of
    its own: tests that fake oneDNN's timings must not write the user's, nor read it."""
    path = tmp_path_factory.mktemp("calibration") / "packed-weights.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lorakit.serving.packed_calibration.calibration_file", lambda: path)
        yield path


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(2, VOCAB, (4, 10))


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A 2-layer BERT encoder (no head) with a word-level tokenizer, saved like a hub model."""
    from tokenizers import processors

    directory = tmp_path_factory.mktemp("tiny-bert")
    backend, size = _word_tokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def causal_dir(tmp_path_factory):
    """A 2-layer Llama with a ChatML chat template, as SmolLM2 has."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    backend, size = _word_tokenizer(extra_special=("<|im_start|>", "<|im_end|>", "user", "assistant"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="<|im_end|>", bos_token="[CLS]")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=tokenizer.eos_token_id, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def reviews_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows(160))
    return str(path)


@pytest.fixture
def sft_jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    with path.open("w") as handle:
        for row in review_rows(160):
            handle.write(json.dumps({"prompt": f"review: {row['text']}", "response": row["label"]}) + "\n")
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("\n".join(row["text"] + "." for row in review_rows(200)))
    return str(path)
