"""A fused autograd path for a LoRA linear layer with a frozen base.

Forward:  y = x·W0ᵀ + b + (s·(m⊙x/(1-p))·Aᵀ)·Bᵀ     (m: dropout mask; ΔW is never formed)
Backward: only what training needs — dA, dB and dx (and db if the bias trains):
    dB = dyᵀ·h                      (h = s·x_d·Aᵀ, r wide, saved)
    dA = s·(dy·B)ᵀ·x_d              (x_d rebuilt from x and the mask)
    dx = dy·W0 + m⊙(s·(dy·B)·A)/(1-p)
What it saves for backward: x (usually alive anyway, shared by q/k/v), the r-wide h, and for
dropout a byte mask (1 byte per element) instead of a dropped float copy of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import linear, matmul


class FusedLoraLinear(torch.autograd.Function):
    """The whole layer in ``dtype`` (x's dtype, or autocast's): a 16-bit base with fp32 LoRA
    weights runs its LoRA matmuls in 16 bits too, as autocast would, and returns fp32 gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, transposed: bool, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # the casts below are the autocast ones
            xc, Ac, Bc = x.to(dtype), A.to(dtype), B.to(dtype)
            base_weight = weight.T if transposed else weight  # Conv1D stores in×out
            out = linear(xc, base_weight.to(dtype), None if bias is None else bias.to(dtype))
            mask = dropout_mask(xc, p) if p > 0 else None
            x_kept = xc * mask if mask is not None else xc
            h = F.linear(x_kept, Ac) * (scaling / (1 - p))  # the 1/(1-p) of dropout folded into the scaling
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), Bc.t())
        ctx.save_for_backward(xc, weight, A, B, mask, h)
        ctx.scaling, ctx.p, ctx.transposed, ctx.x_dtype = scaling, p, transposed, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, mask, h = ctx.saved_tensors
        s, p, dtype = ctx.scaling, ctx.p, x.dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        dh = (dy @ B.to(dtype)) * s  # N×r
        grad_x = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_B = (dy.t() @ h.reshape(-1, h.shape[-1])).to(B.dtype)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            x_kept = x2 * mask.reshape(x2.shape) if mask is not None else x2
            grad_A = (dh.t() @ x_kept).mul_(1 / (1 - p)).to(A.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = matmul(dy, (weight.T if ctx.transposed else weight).to(dtype))
            if mask is None:
                grad_x.addmm_(dh, A.to(dtype))
            else:
                grad_x.addcmul_(dh @ A.to(dtype), mask.reshape(grad_x.shape), value=1 / (1 - p))
            grad_x = grad_x.view(x.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of 0/1 bytes with P(keep) = 1 - p, p rounded to a multiple of 1/65536.

    Each element compares 16 random bits with a threshold, and the bits come 64 at a time from one
    int64 draw: on CPU 4-5x faster than bernoulli_, whose per-element draw was most of dropout's cost.
    uint8 rather than bool: `x * mask` then takes a vectorised path, 3-4x faster than bool's.
    """
    count = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = words.view(torch.int16)[:count].view(x.shape)
    return torch.ge(bits, round(p * 65536) - 32768, out=torch.empty_like(bits, dtype=torch.uint8))


class SharedLoraProjection(torch.autograd.Function):
    """h = (m⊙x/(1-p))·A_catᵀ, column-scaled: the A-projections of every adapter reading the same
    input in one GEMM, with the group's one dropout mask m (drawn by the group, which DoRA members
    also read). Backward: dA_cat and dx only."""

    @staticmethod
    def forward(ctx, x, A_cat, scales, p: float, dtype: torch.dtype, mask=None):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            x_kept = xc * mask if mask is not None else xc
            h = F.linear(x_kept, A_cat.to(dtype)) * (scales / (1 - p)).to(dtype)
        ctx.save_for_backward(xc, A_cat, scales, mask)
        ctx.p, ctx.x_dtype = p, x.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, A_cat, scales, mask = ctx.saved_tensors
        p, dtype = ctx.p, x.dtype
        dh = (grad_h.to(dtype) * (scales / (1 - p)).to(dtype)).reshape(-1, grad_h.shape[-1])
        grad_x = grad_A = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = (dh.t() @ (x2 * mask.reshape(x2.shape) if mask is not None else x2)).to(A_cat.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = dh @ A_cat.to(dtype)
            if mask is not None:
                grad_x.mul_(mask.reshape(grad_x.shape))
            grad_x = grad_x.view(x.shape).to(ctx.x_dtype)
        return grad_x, grad_A, None, None, None, None


class SharedMemberOutput(torch.autograd.Function):
    """y = x·W0ᵀ + b + h·Bᵀ for one member of a shared-input group, its r-wide h given (a slice of
    SharedLoraProjection's output). The B term is added inside the base GEMM's output; backward
    gives dx, dh and dB (db if the bias trains) and nothing for the frozen weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, h, B, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            out = linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]).to(dtype), B.to(dtype).t())
        ctx.save_for_backward(weight, h, B)
        ctx.dtype, ctx.x_dtype, ctx.h_dtype = dtype, x.dtype, h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, h, B = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_bias = grad_h = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(dy, weight.to(ctx.dtype)).view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_h = (dy @ B.to(ctx.dtype)).view(*grad_out.shape[:-1], -1).to(ctx.h_dtype)
        if ctx.needs_input_grad[4]:
            grad_B = (dy.t() @ h.reshape(-1, h.shape[-1]).to(ctx.dtype)).to(B.dtype)
        return grad_x, None, grad_bias, grad_h, grad_B, None


# Projections that read the same input tensor in common architectures (Llama/Mistral/Qwen, BERT).
SHARED_INPUT_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class SharedInputGroup:
    """Sibling LoRA layers fed the same x: the first one called computes every member's r-wide
    projection at once; the others take their slice. Keyed by the identity of x, so a member
    called with another tensor simply recomputes."""

    def __init__(self, layers: list):
        self.layers = layers
        self._x = self._h = self._mask = None
        self._taken: set[int] = set()

    def usable(self, name: str, x: torch.Tensor) -> bool:
        """Every member trains ``name`` on the fused path, of one variant (all DoRA or none), with one
        dropout p."""
        ps, kinds = set(), set()
        for layer in self.layers:
            if layer.fused_adapter(x, (), {}) != name:
                return False
            kinds.add(type(layer.variants[name]))
            ps.add(layer.dropout_p(name))
        return len(ps) == 1 and len(kinds) == 1 and not torch.compiler.is_compiling()

    def slice_for(self, layer, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(this member's r-wide h, the group's dropout mask or None)."""
        index = self.layers.index(layer)
        if self._x is not x or index in self._taken:
            A_cat = torch.cat([m.factors(name)[0] for m in self.layers])
            scales = torch.cat([A_cat.new_full((m.rank(name),), m.scaling[name]) for m in self.layers])
            p = layer.dropout_p(name)
            dtype = compute_dtype(x)
            self._mask = dropout_mask(x.to(dtype), p) if p > 0 else None
            self._x, self._taken = x, set()
            self._h = SharedLoraProjection.apply(x, A_cat, scales, p, dtype, self._mask)
        start = sum(m.rank(name) for m in self.layers[:index])
        h, mask = self._h[..., start:start + layer.rank(name)], self._mask
        self._taken.add(index)
        if len(self._taken) == len(self.layers):
            self._x = self._h = self._mask = None  # every member has its slice: drop the references
        return h, mask
