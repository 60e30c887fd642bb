"""Per-token log-probabilities through the output head, a chunk of rows at a time.

Preference and RL objectives (DPO, ORPO, KTO, GRPO) need log p(token) of the tokens a sequence
holds, not a loss over them. Forming them from the model's logits keeps the whole tokens × vocab
tensor (and its fp32 log-softmax) alive for backward; here each chunk's logits become its rows'
log-probabilities and their gradient with respect to the hidden state at once, ((one-hot − softmax)
/ T)·W, which backward only scales by the upstream gradient of each row. Only rows that carry a
target go through the head at all (prompt tokens are skipped). Numerics follow transformers: logits
in the compute dtype, log-softmax in fp32.

    logps = lk.token_logprobs(model, input_ids, attention_mask, targets)   # (batch, seq), 0 where no target
    logps = lk.gathered_logprobs(model, ids, mask, positions, targets)      # chosen (row, column)s only
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import compute_dtype
from .losses import CHUNK_ELEMENTS, CHUNK_ELEMENTS_16BIT, IGNORE_INDEX, head_logits, supports_chunked_loss


class LinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden·Wᵀ / temperature)[target] per row, in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype: torch.dtype, chunk_rows: int, temperature: float):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            index = targets.unsqueeze(1)
            want_dh = ctx.needs_input_grad[0]
            grad_hidden = torch.empty_like(h) if want_dh else None
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logp = torch.log_softmax(head_logits(h[rows], w).float() / temperature, dim=1)
                out[rows] = logp.gather(1, index[rows]).squeeze(1)
                if want_dh:  # d logp / d logits = one-hot - softmax, times 1/T for the temperature
                    grad = logp.exp_().neg_().scatter_add_(1, index[rows], torch.ones_like(index[rows], dtype=logp.dtype))
                    torch.mm((grad / temperature).to(dtype), w, out=grad_hidden[rows])
        ctx.save_for_backward(grad_hidden, h if ctx.needs_input_grad[1] else None, w, targets)
        ctx.temperature, ctx.chunk_rows, ctx.hidden_dtype, ctx.weight_dtype = temperature, chunk_rows, hidden.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, h, w, targets = ctx.saved_tensors
        g = grad_out.float().unsqueeze(1)
        dh = None if grad_hidden is None else (grad_hidden.float() * g).to(ctx.hidden_dtype)
        dw = None
        if h is not None:  # a trained output head: recompute each chunk's softmax (rarely wanted with LoRA)
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            index = targets.unsqueeze(1)
            for start in range(0, h.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                probs = torch.softmax(head_logits(h[rows], w).float() / ctx.temperature, dim=1)
                grad = probs.neg_().scatter_add_(1, index[rows], torch.ones_like(index[rows], dtype=probs.dtype))
                dw.addmm_((grad * g[rows] / ctx.temperature).t(), h[rows].float())
            dw = dw.to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """log p(targets) under softmax(hidden @ weight.T / temperature), one value per row (fp32)."""
    dtype = compute_dtype(hidden)
    rows = chunk_rows or max(16, CHUNK_ELEMENTS.get(dtype, CHUNK_ELEMENTS_16BIT) // weight.shape[0])
    return LinearLogProbs.apply(hidden, weight, targets.to(hidden.device), dtype, rows, float(temperature))


def gathered_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      **kwargs) -> torch.Tensor:
    """log p(targets[i]) from the output at flat position ``positions[i]`` (row * seq + column) of
    one forward, fp32, shape (N,). A position may score several targets (a prompt's last token
    predicts the first token of each completion that shares it). Causal LMs with a plain head go
    through the chunked head, and only the positions asked for; others take the model's logits."""
    positions, targets = positions.to(input_ids.device), targets.to(input_ids.device)
    if not supports_chunked_loss(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float() / temperature
        return torch.log_softmax(picked, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    kwargs.setdefault("use_cache", False)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    return linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions),
                           model.get_output_embeddings().weight, targets, temperature)


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   targets: torch.Tensor, temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """log p(targets[b, t] | input_ids[b, :t+1]) for every position whose target is not IGNORE_INDEX
    (0 elsewhere), shape (batch, seq), fp32. ``targets`` is already shifted: position t scores token
    t+1 (see shifted_targets)."""
    valid = targets.reshape(-1) != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)
    picked = gathered_logprobs(model, input_ids, attention_mask, rows, targets.reshape(-1)[rows], temperature, **kwargs)
    out = torch.zeros(targets.numel(), dtype=torch.float32, device=input_ids.device)
    return out.index_put((rows.to(out.device),), picked).reshape(targets.shape)


def shifted_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """The targets token_logprobs scores: token t+1 at position t where t+1 is a completion token."""
    targets = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)[..., 1:]
