"""The variant protocol, and plain LoRA as its default.

A layer (layers/base.py) holds one variant object per adapter, chosen from the adapter's config when
the adapter is added, and asks it for what differs between LoRA variants: extra parameters, the
forward term, merging and unmerging, the per-row scale of a mixed batch, the fused training path.
The tensors stay on the layer (under PEFT's attribute names, hence its state-dict keys); a variant
holds only what it computes about them (DoRA's cached norms). A new variant subclasses
``LoraVariant`` and is picked by the layer (``lora_variant`` / ``dora_variant``, layers/base.py).
"""

from __future__ import annotations

import torch

from .. import delta as arith
from ..kernels.lora import FusedLoraLinear, SharedMemberOutput, compute_dtype


class LoraVariant:
    """Plain LoRA: y = base(x) + s·B·A·dropout(x); merging adds s·B·A to the weight."""

    has_magnitude = False  # DoRA's learned magnitude (lora_magnitude_vector) belongs to the adapter

    def init(self, layer, name: str) -> None:
        """Create the variant's own parameters on ``layer`` for a new adapter (none here)."""

    def parameters(self, layer, name: str) -> list[torch.Tensor]:
        """The variant's parameters beyond A and B."""
        return []

    def remove(self, layer, name: str) -> None:
        """Delete the variant's parameters when the adapter is deleted."""

    def forget_values(self, layer, name: str) -> None:
        """The adapter's tensors were overwritten in place (``lk.hotswap_adapter``): drop anything
        computed from them (nothing here)."""

    def add(self, layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the base output) with the adapter's term added."""
        return layer.add_lora(result, x, name)

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return arith.merged_weight(weight, layer.delta_weight(name))

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return arith.unmerged_weight(weight, layer.delta_weight(name))

    def forget_merge(self, layer, name: str) -> None:
        """The adapter is no longer merged (a merge that kept state can drop it)."""

    def mixed_scale(self, layer, name: str) -> torch.Tensor | None:
        """The per-feature factor a mixed batch applies to this adapter's rows (None: 1)."""
        return None

    # the fused training path of a plain nn.Linear / Conv1D (layers/linear.py)
    def fused_linear(self, layer, x: torch.Tensor, name: str) -> torch.Tensor:
        base = layer.base_layer
        A, B = layer.factors(name)
        return FusedLoraLinear.apply(x, base.weight, base.bias, A, B, layer.scaling[name], layer.dropout_p(name),
                                     layer.fan_in_fan_out, compute_dtype(x))

    def shared_member(self, layer, x: torch.Tensor, name: str, h: torch.Tensor, mask) -> torch.Tensor:
        """A member of a shared-input group (q/k/v, gate/up) given its slice ``h`` of the group's
        A-projection."""
        base = layer.base_layer
        return SharedMemberOutput.apply(x, base.weight, base.bias, h, layer.lora_B[name].weight, compute_dtype(x))
