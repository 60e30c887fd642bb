"""The architecture zoo: tiny random-init transformers models of many families, with inputs.

Each entry builds a model from a config (weights don't matter for shapes, selection or format)
and a batch of 4 rows for it. The table is shared by the zoo tests and `benchmarks/zoo.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

VOCAB = 64
H = 16  # hidden size: tiny, divisible by the head counts below
ROWS, SEQ = 4, 6


@dataclass(frozen=True)
class Arch:
    name: str
    kind: str  # encoder, decoder, encoder-decoder, vision, multimodal, moe
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    task_type: str | None = None
    note: str = ""
    lora_extra: tuple = ()  # more LoraConfig fields, as (name, value) pairs

    def config(self, **fields) -> dict:
        """LoraConfig fields (the same for lorakit and PEFT) for "all-linear" on this model."""
        extra = copy.deepcopy(dict(self.lora_extra))  # PEFT extends modules_to_save in place
        return {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "task_type": self.task_type, **extra, **fields}


def _ids():
    return torch.randint(2, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(5))


def text(**extra):
    return lambda: {"input_ids": _ids(), **extra}


def seq2seq():
    return {"input_ids": _ids(), "decoder_input_ids": _ids()[:, :4]}


def pixels(size=16, channels=3):
    return lambda: {"pixel_values": torch.randn(ROWS, channels, size, size, generator=torch.Generator().manual_seed(5))}


def clip_inputs():
    return {"input_ids": _ids(), **pixels()()}


def _model(cls_name: str, config_name: str, **cfg):
    def build():
        config = getattr(tf, config_name)(**cfg)
        return getattr(tf, cls_name)(config).eval()
    return build


ATTN = dict(num_attention_heads=2)
BERTLIKE = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, intermediate_size=2 * H,
                max_position_embeddings=32, **ATTN)
LLAMALIKE = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, intermediate_size=2 * H,
                 num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, **ATTN)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

ZOO: list[Arch] = [
    Arch("bert-seqcls", "encoder", _model("BertForSequenceClassification", "BertConfig", **BERTLIKE),
         text(), "SEQ_CLS"),
    Arch("roberta-seqcls", "encoder",
         _model("RobertaForSequenceClassification", "RobertaConfig", **{**BERTLIKE, "pad_token_id": 1}),
         text(), "SEQ_CLS", "head with dense + out_proj: both saved whole, no LoRA inside"),
    Arch("electra-tokcls", "encoder", _model("ElectraForTokenClassification", "ElectraConfig",
                                             embedding_size=H, **BERTLIKE), text(), "TOKEN_CLS",
         "PEFT 0.21 puts LoRA on the head before it saves it for TOKEN_CLS and fails, so the head is named",
         lora_extra=(("modules_to_save", ["classifier"]),)),
    Arch("distilbert", "encoder", _model("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=H, n_layers=2,
                                         n_heads=2, hidden_dim=2 * H, max_position_embeddings=32), text()),
    Arch("deberta-v2", "encoder", _model("DebertaV2Model", "DebertaV2Config", **BERTLIKE), text()),
    Arch("gpt2", "decoder", _model("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=2,
                                   n_positions=32), text(), "CAUSAL_LM", "Conv1D (fan_in_fan_out)"),
    Arch("llama", "decoder", _model("LlamaForCausalLM", "LlamaConfig", **LLAMALIKE), text(), "CAUSAL_LM"),
    Arch("llama-seqcls", "decoder", _model("LlamaForSequenceClassification", "LlamaConfig", **LLAMALIKE),
         text(), "SEQ_CLS", "score head"),
    Arch("mistral", "decoder", _model("MistralForCausalLM", "MistralConfig", **LLAMALIKE), text(), "CAUSAL_LM"),
    Arch("qwen2", "decoder", _model("Qwen2ForCausalLM", "Qwen2Config", **LLAMALIKE), text(), "CAUSAL_LM"),
    Arch("gemma", "decoder", _model("GemmaForCausalLM", "GemmaConfig", head_dim=8, **LLAMALIKE), text(), "CAUSAL_LM"),
    Arch("phi3", "decoder", _model("Phi3ForCausalLM", "Phi3Config", **LLAMALIKE), text(), "CAUSAL_LM",
         "fused qkv_proj / gate_up_proj"),
    Arch("gpt-neox", "decoder", _model("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=H,
                                       num_hidden_layers=2, intermediate_size=2 * H, max_position_embeddings=32,
                                       **ATTN), text(), "CAUSAL_LM", "fused query_key_value"),
    Arch("bloom", "decoder", _model("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=H, n_layer=2,
                                    n_head=2), text(), "CAUSAL_LM", "fused query_key_value"),
    Arch("falcon", "decoder", _model("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=H,
                                     num_hidden_layers=2, num_attention_heads=2), text(), "CAUSAL_LM",
         "fused query_key_value"),
    Arch("opt", "decoder", _model("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2,
                                  ffn_dim=2 * H, word_embed_proj_dim=H, max_position_embeddings=32, **ATTN),
         text(), "CAUSAL_LM"),
    Arch("gptj", "decoder", _model("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=2,
                                   rotary_dim=4, n_positions=32), text(), "CAUSAL_LM"),
    Arch("t5", "encoder-decoder", _model("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=H,
                                         d_kv=8, d_ff=2 * H, num_layers=2, num_heads=2), seq2seq, "SEQ_2_SEQ_LM",
         "feed-forward reads wo.weight.dtype"),
    Arch("bart", "encoder-decoder", _model("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=H,
                                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                           decoder_attention_heads=2, encoder_ffn_dim=2 * H, decoder_ffn_dim=2 * H,
                                           max_position_embeddings=32), seq2seq, "SEQ_2_SEQ_LM"),
    Arch("vit-imgcls", "vision", _model("ViTForImageClassification", "ViTConfig", hidden_size=H, num_hidden_layers=2,
                                        intermediate_size=2 * H, image_size=16, patch_size=8, num_labels=3, **ATTN),
         pixels(), note="image classification head"),
    Arch("clip", "multimodal", lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                         max_position_embeddings=32, projection_dim=H, **ATTN),
        vision_config=dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, image_size=16, patch_size=8,
                           projection_dim=H, **ATTN),
        projection_dim=H)).eval(), clip_inputs, note="text + vision towers"),
    Arch("mixtral-moe", "moe", _model("MixtralForCausalLM", "MixtralConfig", **LLAMALIKE, **MOE), text(),
         "CAUSAL_LM", "experts are fused 3-D parameters (target_parameters)"),
    Arch("qwen2-moe", "moe", _model("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **LLAMALIKE, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=H,
                                    shared_expert_intermediate_size=H), text(), "CAUSAL_LM", "shared expert"),
]

BY_NAME = {arch.name: arch for arch in ZOO}


def main_output(out) -> torch.Tensor:
    """The tensor a zoo check compares, one row per input row: logits where there are any, else the
    last hidden state (CLIP: both towers' embeddings; its logits mix rows)."""
    if getattr(out, "image_embeds", None) is not None:
        return torch.cat([out.text_embeds, out.image_embeds], dim=-1)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]
