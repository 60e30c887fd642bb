"""DoRA (Liu et al. 2024, PEFT's ``use_dora``): weight-decomposed LoRA.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖

The norm is taken per output feature over the input dimension (per embedding dimension over the
vocabulary for an embedding) and treated as a constant in backward (section 4.3 of the paper), so
only m, A and B get gradients. m, one value per output feature, starts at the norm itself, so an
adapter with B = 0 starts as the base model. It is stored as ``lora_magnitude_vector`` (PEFT's
name and key). With W0·x (bias excluded) as the base result, a layer computes

    y = y_base + (m/‖·‖ − 1) ⊙ W0·x' + (m/‖·‖) ⊙ s·B·A·x'

with x' = dropout(x) (PEFT: when dropout is active the W0 term is recomputed on the dropped x).
An embedding scales its whole output: y = (m/‖·‖) ⊙ (y_base + s·lookup(x, Aᵀ)·Bᵀ).

One variant class per layer type that differs in its forward (linear, convolution, embedding);
merging is the shared arithmetic of delta.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import delta as arith
from ..kernels.dora import FusedDoraLinear, SharedDoraMember
from ..kernels.lora import compute_dtype
from ..kernels.versions import change_key
from .lora import LoraVariant


def column_norm(layer, name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖W + s·B·A‖ per feature (a flat vector), in ``dtype`` (the compute dtype, as PEFT), without
    gradient. A convolution's norm runs over its input channels and kernel."""
    with torch.no_grad():
        dtype = dtype or weight.dtype
        total = weight.to(dtype) + layer.delta_weight(name).to(dtype)
        return arith.feature_norm(total, arith.feature_axis(layer.transpose_delta))


def magnitude_shape(features: int, weight_ndim: int) -> tuple[int, ...]:
    """PEFT's stored shape of m: (features,), or (1, out, 1, ...) for a convolution's weight (it
    broadcasts over the convolution's output, channels second)."""
    return (1, features, *([1] * (weight_ndim - 2))) if weight_ndim > 2 else (features,)


class Dora(LoraVariant):
    """DoRA's parameters, scale and merging; the forward term per layer type in the subclasses."""

    has_magnitude = True

    def __init__(self):
        self.norm_cache = None  # (key, norm) for inference: see scale()
        self.merge_norm = None  # ‖W0 + ΔW‖ of the clean weight while merged, so unmerge divides it back out

    def init(self, layer, name: str) -> None:
        """m = ‖W0 + s·B·A‖ (B is usually still zero) for a new adapter."""
        A, _ = layer.lora_pair(name)
        norm = column_norm(layer, name, layer.base_weight, torch.float32)
        shape = magnitude_shape(layer.lora_dims()[1], len(layer.weight_shape))
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(A.dtype).reshape(shape))

    def parameters(self, layer, name):
        return [layer.lora_magnitude_vector[name]]

    def remove(self, layer, name):
        del layer.lora_magnitude_vector[name]

    def forget_values(self, layer, name):
        # the cache's key has no version for inference tensors: an in-place load would not change it
        self.norm_cache = None

    def scale(self, layer, name: str, dtype: torch.dtype) -> torch.Tensor:
        """m / ‖W0 + s·B·A‖: gradient flows into m only. Without autograd (inference) the norm is
        cached until a weight changes (every in-place update bumps a version counter), so an
        unmerged DoRA adapter then costs what a LoRA adapter costs."""
        magnitude = layer.lora_magnitude_vector[name]
        if torch.is_grad_enabled():
            norm = column_norm(layer, name, layer.base_weight, dtype)
        else:
            weight = layer.base_weight
            key = (dtype, layer.scaling[name], *(change_key(t) for t in (weight, *layer.lora_pair(name))))
            if self.norm_cache is None or self.norm_cache[0] != key:
                self.norm_cache = (key, column_norm(layer, name, weight, dtype))
            norm = self.norm_cache[1]
        return magnitude / norm.to(magnitude.dtype).reshape(magnitude.shape)

    # merging: PEFT's rule. W ← (m/‖W0 + ΔW‖) ⊙ (W + ΔW), the norm from the weight with no adapter
    # merged, kept so that unmerge can divide it back out exactly.
    def merged_weight(self, layer, name, weight):
        axis = arith.feature_axis(layer.transpose_delta)
        self.merge_norm = column_norm(layer, name, layer.unmerged_base_weight(), torch.float32)
        return arith.merged_weight(weight, layer.delta_weight(name).detach(), layer.lora_magnitude_vector[name].detach(),
                                   axis=axis, norm=self.merge_norm)

    def unmerged_weight(self, layer, name, weight):
        """``weight`` with a merged adapter taken out; the kept norm stays until the layer's unmerge
        forgets it (``forget_merge``), so the base can also be recovered on a copy."""
        return arith.unmerged_weight(weight, layer.delta_weight(name).detach(), layer.lora_magnitude_vector[name].detach(),
                                     axis=arith.feature_axis(layer.transpose_delta), norm=self.merge_norm)

    def forget_merge(self, layer, name):
        self.merge_norm = None

    def mixed_scale(self, layer, name):
        """m/‖·‖ for a mixed batch's stacks (inference: no gradient)."""
        with torch.no_grad():
            return self.scale(layer, name, torch.float32)


class DoraLinear(Dora):
    """DoRA around nn.Linear / GPT-2's Conv1D, with fused training paths (kernels/dora.py)."""

    def add(self, layer, result, x, name):
        A, B = layer.lora_pair(name)
        scale = self.scale(layer, name, x.dtype)
        dropout = layer.lora_dropout[name]
        bias = getattr(layer.base_layer, "bias", None)
        if isinstance(dropout, nn.Identity) or not layer.training:
            base = result if bias is None else result - bias
        else:
            x = dropout(x)
            weight = layer.base_weight
            base = F.linear(x, (weight.T if layer.transpose_delta else weight).to(x.dtype))
        lora = F.linear(F.linear(x.to(A.dtype), A), B) * layer.scaling[name]
        return result + ((scale - 1) * base + scale * lora).to(result.dtype)

    def fused_linear(self, layer, x, name):
        A, B = layer.lora_pair(name)
        return FusedDoraLinear.apply(x, layer.base_layer.weight, layer.base_layer.bias, A, B,
                                     layer.lora_magnitude_vector[name], layer.weight_sq_norms(), layer.scaling[name],
                                     layer.dropout_p(name), layer.fan_in_fan_out, compute_dtype(x))

    def shared_member(self, layer, x, name, h, mask):
        A, B = layer.factors(name)
        return SharedDoraMember.apply(x, layer.base_layer.weight, layer.base_layer.bias, h, B,
                                      layer.lora_magnitude_vector[name], layer.weight_sq_norms(), A,
                                      layer.scaling[name], layer.dropout_p(name), mask, layer.fan_in_fan_out,
                                      compute_dtype(x))


class DoraConv(Dora):
    """A convolution: the scale (1, out, 1, ...) broadcasts over channels; the base term is the
    output without bias, or the base convolution of the dropped input under dropout."""

    def add(self, layer, result, x, name):
        scale = self.scale(layer, name, x.dtype)
        dropout = layer.lora_dropout[name]
        bias = layer.base_layer.bias
        if isinstance(dropout, nn.Identity) or not layer.training:
            base = result if bias is None else result - bias.view(1, -1, *([1] * (result.dim() - 2)))
        else:
            x = dropout(x)
            base = layer.base_layer._conv_forward(x, layer.base_weight, None)
        A, B = layer.lora_A[name], layer.lora_B[name]
        lora = B(A(x.to(A.weight.dtype))) * layer.scaling[name]
        return result + ((scale - 1) * base + scale * lora).to(result.dtype)


class DoraEmbedding(Dora):
    """An embedding scales its whole output (its lookup has no separate base term)."""

    def add(self, layer, result, x, name):
        A, B = layer.lora_pair(name)
        scale = self.scale(layer, name, result.dtype)
        lora = (layer._lookup(x, A.T) @ B.T) * layer.scaling[name]
        return (scale * (result + lora)).to(result.dtype)
