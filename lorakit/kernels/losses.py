"""A memory-lean causal-LM loss: the output projection and the cross-entropy, chunked over tokens.

transformers computes the loss from the whole logits tensor (tokens × vocab), upcast to fp32, then
log-softmax, then its gradient: four tokens × vocab fp32 tensors alive at once and several passes
over each (131 MB apiece for 1,024 tokens of a 32k vocabulary). Here the logits of a few rows at a
time are formed, turned into their loss and their gradient (softmax − one-hot) and projected back
to the hidden size at once, so the full logits never exist. The gradient is computed in the
forward pass — the only use of the logits — and backward just scales it. Numerics follow
transformers: logits in the compute dtype, upcast to fp32 for the softmax, the gradient cast back.

    loss = lk.causal_lm_loss(model, input_ids=ids, labels=ids)   # == model(...).loss
    model = lk.ChunkedLossLM(model)                               # or as a module (DDP wraps it)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cpu import matmul
from .lora import compute_dtype

IGNORE_INDEX = -100
# Logits per chunk: the fastest sizes measured here (about 128 rows of a 32k vocabulary in 16 bits,
# 256 in fp32), a 32 MB working set whatever the batch size.
CHUNK_ELEMENTS = {torch.float32: 1 << 23, torch.float64: 1 << 22}
CHUNK_ELEMENTS_16BIT = 1 << 22
VOCAB_SLICE = 2048

# Causal LMs whose logits are exactly lm_head(decoder(...)): no logit scaling or soft-capping.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gpt2"})


class LinearCrossEntropy(torch.autograd.Function):
    """mean over labelled rows of CE(hidden·Wᵀ, labels); rows labelled IGNORE_INDEX count for nothing."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype: torch.dtype, chunk_rows: int):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = labels != IGNORE_INDEX
            targets = labels.clamp(min=0).unsqueeze(1)
            # mean over labelled rows: each labelled row weighs 1/count, the others 0
            row_weight = valid / valid.sum().clamp(min=1).to(torch.float32)
            want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(h) if want_dh else None
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_dw else None
            row_loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                # one fused kernel upcasts the chunk's logits and takes their softmax in fp32
                probs = torch.softmax(head_logits(h[rows], w), dim=1, dtype=torch.float32)
                target = targets[rows]
                row_loss[rows] = -probs.gather(1, target).squeeze(1).log()
                if want_dh or want_dw:
                    # dloss/dlogits = softmax - one-hot (times the row weight, applied after the GEMM)
                    grad_logits = probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    grad_logits = grad_logits.to(dtype)
                    if want_dh:
                        matmul(grad_logits, w, out=grad_hidden[rows])
                    if want_dw:
                        grad_weight.addmm_(grad_logits.t().float(), h[rows].float() * row_weight[rows, None])
            underflow = valid & ~torch.isfinite(row_loss)
            if underflow.any():  # a target probability below fp32's range: take its loss the long way
                index = underflow.nonzero().squeeze(1)
                logits = (h[index] @ w.t()).float()
                row_loss[index] = torch.logsumexp(logits, 1) - logits.gather(1, targets[index]).squeeze(1)
            if want_dh:
                grad_hidden.mul_(row_weight.unsqueeze(1))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return (row_loss.masked_fill(~valid, 0) * row_weight).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = None if grad_hidden is None else (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(ctx.hidden_dtype)
        dw = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden·weightᵀ. fp32 on CPU: in slices of the vocabulary, which keeps each GEMM's packed
    weight block in cache (the GEMM measured 1.2x faster for a 32k vocabulary; no gain in bf16).
    bf16 on a CPU without a bf16 unit: multiplied in fp32 (cpu.matmul)."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return matmul(hidden, weight.t())
    out = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_SLICE):
        torch.mm(hidden, weight[start:start + VOCAB_SLICE].t(), out=out[:, start:start + VOCAB_SLICE])
    return out


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned, IGNORE_INDEX =
    no loss), averaged over the labelled rows, without forming the logits of more than a chunk."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != hidden2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden2.shape[0]} hidden rows but {labels.shape[0]} labels")
    dtype = compute_dtype(hidden)
    rows = chunk_rows or max(16, CHUNK_ELEMENTS.get(dtype, CHUNK_ELEMENTS_16BIT) // weight.shape[0])
    return LinearCrossEntropy.apply(hidden2, weight, labels, dtype, rows)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored on token t+1; the last position has nothing to predict."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """True when the model's logits are a plain linear head over its decoder's last hidden state."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a wrapper whose .weight is the weight its forward uses (trainable tokens) counts as plain
    linear = type(head) is torch.nn.Linear or (
        getattr(head, "effective_weight", False) and type(getattr(head, "original_module", None)) is torch.nn.Linear)
    return (config is not None and config.model_type in PLAIN_HEAD_MODEL_TYPES
            and linear and head.bias is None and hasattr(model, "get_decoder"))


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``model(input_ids, labels=labels).loss`` with the chunked head; models whose head is not
    plain (see supports_chunked_loss) take transformers' own path."""
    if not supports_chunked_loss(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    kwargs.setdefault("use_cache", False)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    return linear_cross_entropy(hidden, model.get_output_embeddings().weight, shift_labels(labels))


class ChunkedLossLM(torch.nn.Module):
    """A causal LM whose forward returns only the loss, computed by causal_lm_loss: use it in place
    of the model in a training step (it can be wrapped by DDP). ``model`` stays reachable as .model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, **kwargs) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(loss=causal_lm_loss(self.model, input_ids, labels, attention_mask, **kwargs))
