"""LoRA around ``nn.Linear`` and GPT-2's ``Conv1D``: the general path, the fused training paths
(plain LoRA, DoRA, and the shared-input groups of q/k/v and gate/up), and loop-free mixed batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dora import row_sq_norms
from ..kernels.packed_linear import PackedLinear
from ..kernels.versions import change_key
from ..variants.dora import DoraLinear
from ..variants.principal import is_principal_init, principal_init
from .base import ModulePairLayer, conv1d_class, lora_dims_of


class LoraLinear(ModulePairLayer):
    """LoRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (whose weight is stored in×out)."""

    dora_variant = DoraLinear

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, conv1d_class())
        self.transpose_delta = self.fan_in_fan_out
        # Exactly nn.Linear / Conv1D (not a subclass with its own forward; a server's PackedLinear
        # computes the same product): their output is not kept for backward, and their weight is
        # all the fused path needs.
        self.plain_base = type(base_layer) in (nn.Linear, PackedLinear, conv1d_class())
        self.in_features, self.out_features = lora_dims_of(base_layer)

    def lora_dims(self):
        return self.in_features, self.out_features

    def create_pair(self, name, r, dtype, device):
        # rank 0 (an AdaLoRA layer pruned to nothing) is built empty: nn.Linear warns when initialising it
        if r == 0:
            self.lora_A[name] = nn.Linear(self.in_features, 0, bias=False, dtype=dtype, device="meta").to_empty(device=device)
            self.lora_B[name] = nn.Linear(0, self.out_features, bias=False, dtype=dtype, device="meta").to_empty(device=device)
            return
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)

    def reset_adapter(self, name: str, init) -> None:
        A, B = self.lora_pair(name)
        with torch.no_grad():
            if A.numel() == 0:
                return
            if init is True:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)
            elif init == "gaussian":
                nn.init.normal_(A, std=1 / A.shape[0])
                nn.init.zeros_(B)
            elif is_principal_init(init):  # PiSSA / OLoRA: also leaves the residual in the base
                principal_init(self, name, init)
            # init False keeps nn.Linear's random init for both: a non-identity start, for tests.

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = self.fused_adapter(x, args, kwargs)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        group = self.__dict__.get("shared_input")
        if group is not None and group.usable(fused, x):
            # q/k/v (gate/up) share one A-projection GEMM and one dropout mask
            h, mask = group.slice_for(self, fused, x)
            return self.variants[fused].shared_member(self, x, fused, h, mask)
        return self.variants[fused].fused_linear(self, x, fused)

    def weight_sq_norms(self) -> torch.Tensor:
        weight = self.base_layer.weight
        key = change_key(weight)
        cached = self.__dict__.get("_weight_sq_norms")
        if cached is None or cached[0] != key:  # the frozen base's ‖W0‖² per row, once
            cached = (key, row_sq_norms(weight, self.fan_in_fan_out))
            self.__dict__["_weight_sq_norms"] = cached
        return cached[1]

    def fused_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The adapter to run through the fused autograd path, or None for the general path: used
        when training one unmerged adapter on a frozen plain Linear/Conv1D in a single dtype."""
        # grad mode first: inference forwards (serving) stop at the cheapest check
        if not torch.is_grad_enabled() or args or kwargs or self.disabled or self.mixed is not None:
            return None
        active = self.unmerged_active()
        if len(active) != 1 or not self.plain_base:
            return None
        A, B = self.lora_pair(active[0])
        weight = self.base_layer.weight
        if weight.requires_grad or not (A.requires_grad or B.requires_grad) or A.dtype != B.dtype or A.shape[0] == 0:
            return None
        # one compute dtype: autocast's, or x's when x and the base weight agree (a 16-bit base with
        # fp32 LoRA weights computes its LoRA matmuls in 16 bits, as autocast does)
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
            return None
        return active[0]

    def accumulates_in_place(self, result: torch.Tensor) -> bool:
        # nn.Linear / Conv1D do not keep their output for backward, so the LoRA term can be added
        # into it inside the GEMM (beta=1): no extra pass over the output, no extra tensor.
        return self.plain_base and result.is_contiguous()

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        if A.shape[0] == 0:  # AdaLoRA may prune a layer down to no triplet at all
            return result
        # Scale the r-wide intermediate rather than the out-wide result: same math, less work.
        h = F.linear(self.lora_dropout[name](x.to(A.dtype)), A) * self.scaling[name]
        if h.dtype != result.dtype:
            return result + F.linear(h, B).to(result.dtype)
        h2 = h.reshape(-1, h.shape[-1])
        if self.accumulates_in_place(result):
            # in-place ops escape autocast: under it h is 16-bit while B stays fp32
            result.view(-1, result.shape[-1]).addmm_(h2, B.t().to(h2.dtype))
            return result
        return torch.addmm(result.reshape(-1, result.shape[-1]), h2, B.t()).view(result.shape)

    def add_mixed_dora(self, result: torch.Tensor, x: torch.Tensor, mixed) -> torch.Tensor:
        """Mixed rows when some adapter uses DoRA: y + (k−1)⊙(y − b) + k⊙s·B·A·x with k each row's
        scale (1 for plain LoRA and base rows): still two batched matmuls, no loop over adapters."""
        batch = x.shape[0]
        A_rows, B_rows, _ = mixed.row_pairs(batch)
        scale = mixed.scale_stack.index_select(0, mixed.rows_for(batch)).unsqueeze(1)
        lora = torch.bmm(torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(A_rows.dtype), A_rows), B_rows)
        y = result.reshape(batch, -1, result.shape[-1])
        bias = getattr(self.base_layer, "bias", None)
        base = y if bias is None else y - bias
        return (y + (scale - 1) * base + scale * lora).view(result.shape).to(result.dtype)

    def add_mixed(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixed  # a per-thread lookup: read once
        batch = x.shape[0]
        if mixed.scale_stack is not None:
            return self.add_mixed_dora(result, x, mixed)
        x3 = x.reshape(batch, -1, x.shape[-1])
        # Serving a 16-bit base: the LoRA term in the base's precision, as vLLM computes it (its
        # rounding is far below the 16-bit rounding of the sum it joins) instead of converting every
        # activation to the adapters' fp32 and back; a fifth of a mixed prefill's time in bf16.
        grad = torch.is_grad_enabled()
        low = x3.dtype if x3.dtype in (torch.bfloat16, torch.float16) and not grad else None
        one_token = x3.shape[1] == 1 and not self.training
        kernel = mixed.shared.get("kernel") if one_token and not grad else None
        if kernel is not None and x3.dtype == result.dtype and self.accumulates_in_place(result):
            # one token per row through lorakit's kernel: each row only its own adapter's A and B
            A, B, slots = mixed.per_slot(batch, low or mixed.A_stack.dtype)
            x2, out = x3.reshape(batch, -1), result.view(batch, -1)
            if kernel.supports(out, x2, A):
                kernel.add(out, x2, A, B, slots)
                return result
        together = mixed.concatenated(batch, low or mixed.A_stack.dtype) if one_token else None
        if together is not None:  # one token per row (decoding): all adapters in two GEMMs
            A_cat, B_cat, own = together
            h = torch.mm(x.reshape(batch, -1).to(A_cat.dtype), A_cat).mul_(own.view(batch, -1))
            if h.dtype == result.dtype and not grad and self.accumulates_in_place(result):
                result.view(batch, -1).addmm_(h, B_cat)  # the B term added inside its GEMM
                return result
            return result + torch.mm(h, B_cat).view(result.shape).to(result.dtype)
        A_rows, B_rows, p = mixed.row_pairs(batch)
        if low:
            A_rows, B_rows = A_rows.to(low), B_rows.to(low)
        x3 = x3.to(A_rows.dtype)
        if self.training and bool(p.any()):
            p = p.view(batch, 1, 1)
            x3 = x3 * (torch.rand_like(x3) >= p) / (1 - p)
        h = torch.bmm(x3, A_rows)
        if result.dtype != h.dtype:
            return result + torch.bmm(h, B_rows).view(result.shape).to(result.dtype)
        if self.accumulates_in_place(result):
            result.view(batch, -1, result.shape[-1]).baddbmm_(h, B_rows)
            return result
        return torch.baddbmm(result.reshape(batch, -1, result.shape[-1]), h, B_rows).view(result.shape)
