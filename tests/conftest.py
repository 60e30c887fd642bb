"""Small random-init models of several families; the weights don't matter for shape or format."""

import warnings

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*target_modules entries matched no module.*")

VOCAB = 96


def tiny_bert(seed=0, num_labels=2, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


FAMILIES = {
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"]),
}


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(2, VOCAB, (4, 10))


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def randomize_lora(model, scale=0.5, seed=7):
    """Give every LoRA B a non-zero value so adapters change outputs (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# tiny models saved on disk and small data files, for the training and CLI tests
from saved_models import causal_dir, classifier_dir, reviews_csv, sft_jsonl, text_file  # noqa: E402,F401
