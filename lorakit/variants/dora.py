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

This module is the DoRA piece of the layer family: a layer with a magnitude for an adapter asks
``DoraVariant`` for that adapter's forward, merge and unmerge; plain LoRA never comes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_axis(layer) -> int:
    """The axis of the base weight that holds the features m scales: out×in Linear → 0; GPT-2's
    Conv1D (in×out) and an embedding table (num×dim) → 1. The norm runs over the other axis."""
    return 1 if layer.transpose_delta else 0


def column_norm(layer, name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖W + s·B·A‖ per feature (a flat vector), in ``dtype`` (the compute dtype, as PEFT), without
    gradient. A convolution's norm runs over its input channels and kernel."""
    with torch.no_grad():
        dtype = dtype or weight.dtype
        total = weight.to(dtype) + layer.delta_weight(name).to(dtype)
        axis = feature_axis(layer)
        return torch.linalg.vector_norm(total, dim=[d for d in range(total.dim()) if d != axis])


def _along_features(layer, vector: torch.Tensor) -> torch.Tensor:
    """``vector`` shaped to broadcast over the base weight's feature axis."""
    shape = [1] * layer.base_weight.dim()
    shape[feature_axis(layer)] = -1
    return vector.reshape(shape)


def magnitude_shape(layer) -> tuple[int, ...]:
    """PEFT's stored shape: (features,), or (1, out, 1, ...) for a convolution (it broadcasts over
    the convolution's output, channels second)."""
    features = layer.lora_dims()[1]
    ndim = layer.base_weight.dim()
    return (1, features, *([1] * (ndim - 2))) if ndim > 2 else (features,)


class DoraVariant:
    """DoRA's forward, merge and unmerge for a LoraLinear / LoraEmbedding adapter."""

    @staticmethod
    def add_magnitude(layer, name: str) -> None:
        """Create m = ‖W0 + s·B·A‖ (B is usually still zero) for a new adapter."""
        A, _ = layer.lora_pair(name)
        norm = column_norm(layer, name, layer.base_weight, torch.float32)
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(A.dtype).reshape(magnitude_shape(layer)))

    @staticmethod
    def scale(layer, name: str, dtype: torch.dtype) -> torch.Tensor:
        """m / ‖W0 + s·B·A‖: gradient flows into m only. Without autograd (inference) the norm is
        cached until a weight changes (every in-place update bumps a version counter), so an
        unmerged DoRA adapter then costs what a LoRA adapter costs."""
        magnitude = layer.lora_magnitude_vector[name]
        if torch.is_grad_enabled():
            norm = column_norm(layer, name, layer.base_weight, dtype)
        else:
            weight = layer.base_weight
            key = (dtype, layer.scaling[name], *((t.data_ptr(), t._version) for t in (weight, *layer.lora_pair(name))))
            cache = layer.__dict__.setdefault("_dora_norm_cache", {})
            if cache.get(name, (None,))[0] != key:
                cache[name] = (key, column_norm(layer, name, weight, dtype))
            norm = cache[name][1]
        return magnitude / norm.to(magnitude.dtype).reshape(magnitude.shape)

    @staticmethod
    def add_linear(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = layer.lora_pair(name)
        scale = DoraVariant.scale(layer, name, x.dtype)
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

    @staticmethod
    def add_conv(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """A convolution: the scale (1, out, 1, ...) broadcasts over channels; the base term is the
        output without bias, or the base convolution of the dropped input under dropout."""
        scale = DoraVariant.scale(layer, name, x.dtype)
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

    @staticmethod
    def add_embedding(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = layer.lora_pair(name)
        scale = DoraVariant.scale(layer, name, result.dtype)
        lora = (layer._lookup(x, A.T) @ B.T) * layer.scaling[name]
        return (scale * (result + lora)).to(result.dtype)

    # merging: PEFT's rule. W ← (m/‖W0 + ΔW‖) ⊙ (W + ΔW), the norm from the weight with no adapter
    # merged, kept so that unmerge can divide it back out exactly.
    @staticmethod
    def merged_weight(layer, name: str, weight: torch.Tensor, clean_weight: torch.Tensor) -> torch.Tensor:
        norm = column_norm(layer, name, clean_weight, torch.float32)
        layer.__dict__.setdefault("_dora_merge_norms", {})[name] = norm
        factor = _along_features(layer, layer.lora_magnitude_vector[name].detach().float().flatten() / norm)
        return factor * (weight.float() + layer.delta_weight(name).detach().float())

    @staticmethod
    def unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with a merged adapter taken out; its kept norm stays until the layer's unmerge
        forgets it (``forget_merge``), so the base can also be recovered on a copy."""
        norm = layer.__dict__["_dora_merge_norms"][name]
        factor = _along_features(layer, layer.lora_magnitude_vector[name].detach().float().flatten() / norm)
        return weight.float() / factor - layer.delta_weight(name).detach().float()

    @staticmethod
    def forget_merge(layer, name: str) -> None:
        layer.__dict__.get("_dora_merge_norms", {}).pop(name, None)

    @staticmethod
    def mixed_scale(layer, name: str) -> torch.Tensor:
        """m/‖·‖ for a mixed batch's stacks (inference: no gradient)."""
        with torch.no_grad():
            return DoraVariant.scale(layer, name, torch.float32)
