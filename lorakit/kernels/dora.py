"""A fused autograd path for training a DoRA linear layer on a frozen base (see variants/dora.py for DoRA).

Without dropout, y = b + k ⊙ z with z = W0·x + s·B·A·x and k = m / n, n = ‖W0 + s·B·A‖ per output
feature, held constant in backward (DoRA §4.3, as PEFT). What PEFT pays for, and this path does not:

- ΔW is never formed. n² = ‖W0‖² + 2s·Σ_j B[o,j]·(W0·Aᵀ)[o,j] + s²·Σ_j (B·A·Aᵀ)[o,j]·B[o,j]: one
  out×r product W0·Aᵀ and an r×r Gram matrix, and ‖W0‖² per row computed once (W0 is frozen).
- no second pass of the base layer, no identity-matrix trick; the norm is computed once per step.
- backward keeps x, the r-wide h and the layer's own output y (which the next op usually keeps
  anyway), and recovers z = (y − b)/k instead of storing it.

With dropout (probability p, mask M), PEFT's semantics: y = W0·x + b + (k−1) ⊙ W0·x_d + k ⊙ s·B·A·x_d
with x_d = M⊙x/(1−p); t = W0·x_d + s·B·A·x_d is kept for the gradient of m.

Gradients (dz = dy ⊙ k):  dm = Σ_tokens dy ⊙ z / n (t under dropout);  dB = dzᵀ·h;  dA = s·(dz·B)ᵀ·x_d;
dx = dz·W0 + s·(dz·B)·A (under dropout: dy·W0 + M⊙((k−1)⊙dy·W0 + s·(dz·B)·A)/(1−p)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import dropout_mask


def row_sq_norms(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """‖W0[o, :]‖² per output feature, in fp32."""
    return weight.float().pow(2).sum(0 if transposed else 1)


def dora_norm(weight: torch.Tensor, w_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
              transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output feature, in fp32, without forming B·A."""
    with torch.no_grad():
        W = weight.T if transposed else weight  # out×in
        WA = F.linear(W.to(dtype), A.to(dtype)).float()  # out×r = W0·Aᵀ
        Bf, Af = B.float(), A.float()
        cross = (Bf * WA).sum(1)
        square = ((Bf @ (Af @ Af.T)) * Bf).sum(1)
        return (w_sq + 2 * scaling * cross + scaling * scaling * square).clamp_min(0).sqrt()


def _dora_output(xc, W, x_d, h, Bc, k, bias, dtype, dropout: bool):
    """y, and what backward keeps of it (y itself, or t under dropout); h = s·x_d·Aᵀ is given."""
    h2 = h.reshape(-1, h.shape[-1])
    if not dropout:
        y = F.linear(xc, W)
        y.view(-1, y.shape[-1]).addmm_(h2, Bc.t())  # z = W0·x + s·B·A·x
        y.mul_(k)
        t = None
    else:
        t = F.linear(x_d, W)
        t.view(-1, t.shape[-1]).addmm_(h2, Bc.t())  # t = W0·x_d + s·B·A·x_d
        y = F.linear(xc, W)
        y.view(-1, y.shape[-1]).addcmul_(t.view(-1, t.shape[-1]), (k - 1).expand(1, -1))
        y.view(-1, y.shape[-1]).addmm_(h2, Bc.t())
    if bias is not None:
        y.add_(bias.to(dtype))
    return y, (y if t is None else t)


def _dora_gradients(ctx, grad_out, kept, bias, magnitude, k32, norm, weight, B, mask):
    """The gradients every DoRA member shares: dm, dB's dz, dh = dz·B (r wide, unscaled), the input
    gradient without its A term, and db."""
    p, dtype = ctx.p, ctx.dtype
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    dy32 = dy.float()
    if mask is None:  # z = (y − b)/k, from the saved output
        z = kept.reshape(-1, kept.shape[-1]).float()
        if bias is not None:
            z = z - bias.float()
        z = z / k32
    else:
        z = kept.reshape(-1, kept.shape[-1]).float()  # t
    grad_m = ((dy32 * z).sum(0) / norm).to(magnitude.dtype).view(magnitude.shape)
    dz = (dy32 * k32).to(dtype)
    W = (weight.T if ctx.transposed else weight).to(dtype)
    dh = dz @ B.to(dtype)  # N×r
    grad_x_base = None
    if ctx.needs_input_grad[0]:
        if mask is None:
            grad_x_base = dz @ W
        else:  # dy·W0 + M⊙((k−1)⊙dy·W0)/(1−p): the A term is added by the caller
            inner = ((dy32 * (k32 - 1)).to(dtype)) @ W
            grad_x_base = (dy.to(dtype) @ W).addcmul_(inner, mask.reshape(inner.shape), value=1 / (1 - p))
    grad_bias = dy32.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return grad_m, dz, dh, grad_x_base, grad_bias


class FusedDoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, w_sq, scaling: float, p: float, transposed: bool,
                dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc, Ac, Bc = x.to(dtype), A.to(dtype), B.to(dtype)
            W = (weight.T if transposed else weight).to(dtype)
            norm = dora_norm(weight, w_sq, A, B, scaling, transposed, dtype)
            k32 = magnitude.detach().float() / norm
            mask = dropout_mask(xc, p) if p > 0 else None
            x_d = xc * mask * (1 / (1 - p)) if mask is not None else xc
            h = F.linear(x_d, Ac) * scaling  # N… × r
            y, kept = _dora_output(xc, W, x_d, h, Bc, k32.to(dtype), bias, dtype, mask is not None)
        ctx.save_for_backward(xc, weight, bias, A, B, magnitude, mask, h, k32, norm, kept)
        ctx.scaling, ctx.p, ctx.transposed, ctx.x_dtype, ctx.dtype = scaling, p, transposed, x.dtype, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, A, B, magnitude, mask, h, k32, norm, kept = ctx.saved_tensors
        s, p, dtype = ctx.scaling, ctx.p, x.dtype
        grad_m, dz, dh, grad_x, grad_bias = _dora_gradients(ctx, grad_out, kept, bias, magnitude, k32, norm,
                                                            weight, B, mask)
        grad_A = grad_B = None
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[4]:
            grad_B = (dz.t() @ h.reshape(-1, h.shape[-1])).to(B.dtype)
        if ctx.needs_input_grad[3]:
            x_d = x2 * mask.reshape(x2.shape) * (1 / (1 - p)) if mask is not None else x2
            grad_A = ((dh.t() @ x_d) * s).to(A.dtype)
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x.addmm_(dh, A.to(dtype), alpha=s)
            else:
                grad_x.addcmul_(dh @ A.to(dtype), mask.reshape(grad_x.shape), value=s / (1 - p))
            grad_x = grad_x.view(x.shape).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None, None, None, None, None


class SharedDoraMember(torch.autograd.Function):
    """One DoRA member of a shared-input group (q/k/v, gate/up): its h = s·x_d·Aᵀ is a slice of the
    group's one projection (kernels.SharedLoraProjection, which also owns dA and the A term of dx),
    and the dropout mask is the group's one mask. Gives dx (without the A term), dh, dB, dm, db."""

    @staticmethod
    def forward(ctx, x, weight, bias, h, B, magnitude, w_sq, A, scaling: float, p: float, mask, transposed: bool,
                dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc, Bc = x.to(dtype), B.to(dtype)
            W = (weight.T if transposed else weight).to(dtype)
            norm = dora_norm(weight, w_sq, A.detach(), B.detach(), scaling, transposed, dtype)
            k32 = magnitude.detach().float() / norm
            x_d = xc * mask * (1 / (1 - p)) if mask is not None else xc
            y, kept = _dora_output(xc, W, x_d, h.to(dtype), Bc, k32.to(dtype), bias, dtype, mask is not None)
        ctx.save_for_backward(weight, bias, B, magnitude, mask, h, k32, norm, kept)
        ctx.p, ctx.transposed, ctx.x_dtype, ctx.dtype, ctx.h_dtype = p, transposed, x.dtype, dtype, h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, bias, B, magnitude, mask, h, k32, norm, kept = ctx.saved_tensors
        grad_m, dz, dh, grad_x, grad_bias = _dora_gradients(ctx, grad_out, kept, bias, magnitude, k32, norm,
                                                            weight, B, mask)
        grad_B = (dz.t() @ h.reshape(-1, h.shape[-1]).to(ctx.dtype)).to(B.dtype) if ctx.needs_input_grad[4] else None
        grad_h = dh.view(*grad_out.shape[:-1], -1).to(ctx.h_dtype) if ctx.needs_input_grad[3] else None
        if grad_x is not None:
            grad_x = grad_x.view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_h, grad_B, grad_m, None, None, None, None, None, None, None
