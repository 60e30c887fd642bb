"""LoRA on a parameter rather than a module (PEFT's ``target_parameters``).

Mixture-of-experts models in transformers keep their experts as fused 3-D parameters (experts ×
out × in, e.g. Mixtral's ``experts.gate_up_proj``) and their routers as modules with a bare
``weight``: no nn.Linear to wrap. ``LoraParam`` wraps the module that owns the parameter and, for
the duration of a forward, hands that module W + ΔW instead of W.

Layout (PEFT's, so files load both ways): for E experts, A is (r·E)×in and B is out×(r·E);
expert e uses rows e·r … e·r+r−1 of A and the columns j·E + e of B, i.e. ΔW[e] = s·B[:, :, e]·A[e]
with A viewed E×r×in and B viewed out×r×E. A 2-D parameter is one ordinary out×in LoRA pair.
Several parameters of one module nest: each wrapper adapts one parameter, the first-registered
parameter innermost, so its keys read ``<module>.base_layer.lora_A.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModulePairLayer, RowGroupedMixed
from .linear import LoraLinear


def param_geometry(module: nn.Module, param: torch.Tensor) -> tuple[int, int, int, bool]:
    """(experts, in, out, swapped) of a targeted parameter, as PEFT reads them.

    A 3-D parameter is experts × out × in unless the module says ``is_transposed`` (experts × in ×
    out); a 2-D one is out × in (one "expert")."""
    if param.dim() == 2:
        return 1, param.shape[1], param.shape[0], False
    if param.dim() != 3:
        raise ValueError(f"only 2-D and 3-D parameters can take LoRA, got {param.dim()}-D")
    experts, first, second = param.shape
    if getattr(module, "is_transposed", False):
        return experts, first, second, False
    return experts, second, first, True


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraParam):
        module = module.base_layer
    return module


class LoraParam(RowGroupedMixed, ModulePairLayer):
    """LoRA on one parameter of ``base_layer`` (which may itself be a LoraParam for another one)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner = innermost(base_layer)
        self.num_experts, self.in_features, self.out_features, self.swapped = param_geometry(
            owner, getattr(owner, parameter_name))

    def lora_dims(self):
        return self.in_features, self.out_features

    def rank(self, name: str) -> int:
        return self.lora_pair(name)[0].shape[0] // self.num_experts

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(innermost(self.base_layer), self.parameter_name)

    def reference(self) -> torch.Tensor:
        return self.base_weight

    def create_pair(self, name, r, dtype, device):
        width = r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, width, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(width, self.out_features, bias=False, dtype=dtype, device=device)

    def reset_adapter(self, name: str, init) -> None:
        LoraLinear.reset_adapter(self, name, init)  # the same init as a Linear pair

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_pair(name)
        scale = self.scaling[name]
        if self.num_experts == 1:
            return (B @ A) * scale
        A3 = A.reshape(self.num_experts, -1, A.shape[-1])  # E × r × in
        B3 = B.reshape(B.shape[0], -1, self.num_experts)  # out × r × E
        layout = "e o i" if self.swapped else "e i o"
        return torch.einsum(f"o r e, e r i -> {layout.replace(' ', '')}", B3, A3) * scale

    # forward: the owner module sees W + ΔW for this call only. The outermost wrapper applies the
    # updates of every nested wrapper in one call of the real module.
    def forward(self, *args, **kwargs):
        if self.mixed is not None:
            return self._forward_mixed(args, kwargs)
        return self._call_owner(lambda w: [] if w.disabled else w.unmerged_active(), args, kwargs)

    def _chain(self) -> list["LoraParam"]:
        chain, module = [], self
        while isinstance(module, LoraParam):
            chain.append(module)
            module = module.base_layer
        return chain

    def _call_owner(self, names_of, args, kwargs):
        swapped = {}
        for wrapper in self._chain():
            names = [n for n in names_of(wrapper) if n in wrapper.adapter_names]
            if names:
                weight = wrapper.base_weight
                delta = sum(wrapper.delta_weight(n) for n in names)
                swapped[wrapper.parameter_name] = weight + delta.to(weight.dtype)
        owner = innermost(self)
        if not swapped:
            return owner(*args, **kwargs)
        return torch.func.functional_call(owner, swapped, tuple(args), kwargs)

    def _forward_mixed(self, args, kwargs):
        """Rows (tokens: MoE blocks see them flattened) grouped by adapter, one call per adapter in
        the batch: a parameter's update is a whole weight, so rows cannot share one matmul."""
        first = args[0]
        out = None
        for name, rows in self.mixed.adapter_rows(first.shape[0]):
            part_args = tuple(a.index_select(0, rows) if _row_tensor(a, first) else a for a in args)
            chosen = [name] if name is not None else []
            part = self._call_owner(lambda w: [] if w.disabled else chosen, part_args, kwargs)
            out = _scatter_rows(out, part, rows, first.shape[0])
        return out


def _row_tensor(value, first: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == first.shape[0]


def _scatter_rows(out, part, rows, total):
    if isinstance(part, tuple):
        out = out or tuple(None for _ in part)
        return tuple(_scatter_rows(o, p, rows, total) for o, p in zip(out, part))
    if out is None:
        out = part.new_zeros((total, *part.shape[1:]))
    out[rows] = part
    return out
