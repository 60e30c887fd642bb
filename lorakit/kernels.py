"""A fused autograd path for a LoRA linear layer with a frozen base.

Forward:  y = x·W0ᵀ + b + (s·(m⊙x/(1-p))·Aᵀ)·Bᵀ     (m: dropout mask; ΔW is never formed)
Backward: only what training needs — dA, dB and dx (and db if the bias trains):
    dB = dyᵀ·h                      (h = s·x_d·Aᵀ, r wide, saved)
    dA = s·(dy·B)ᵀ·x_d              (x_d rebuilt from x and the mask)
    dx = dy·W0 + m⊙(s·(dy·B)·A)/(1-p)
What it saves for backward: x (usually alive anyway, shared by q/k/v), the r-wide h, and for
dropout a bool mask (1 byte per element) instead of a dropped float copy of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, transposed: bool):
        base_weight = weight.T if transposed else weight  # Conv1D stores in×out
        out = F.linear(x, base_weight, bias)
        mask = torch.rand_like(x) >= p if p > 0 else None
        x_d = x * mask / (1 - p) if mask is not None else x
        h = F.linear(x_d, A) * scaling
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t())
        ctx.save_for_backward(x, weight, A, B, mask, h)
        ctx.scaling, ctx.p, ctx.transposed = scaling, p, transposed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, mask, h = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dh = (dy @ B) * s  # N×r
        grad_x = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_B = dy.t() @ h.reshape(-1, h.shape[-1])
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            x_d = x2 * mask.reshape(x2.shape) / (1 - p) if mask is not None else x2
            grad_A = dh.t() @ x_d
        if ctx.needs_input_grad[0]:
            grad_x = dy @ (weight.T if ctx.transposed else weight)
            if mask is None:
                grad_x.addmm_(dh, A)
            else:
                grad_x.addcmul_(dh @ A, mask.reshape(grad_x.shape), value=1 / (1 - p))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None
