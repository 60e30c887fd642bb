"""The merge arithmetic, once: a LoRA update in its base weight's layout, and a weight with it folded
in or taken out. Pure functions of tensors, used by the layers (``lk.merge``) and by merging on
checkpoint files (io/streaming_merge.py), so both give the same bits.

  ΔW = s·B·(A⊙Λ)                          (Λ: AdaLoRA's singular values; none for plain LoRA)
  W' = W + ΔW                              plain LoRA
  W' = (m / ‖W0 + ΔW‖) ⊙ (W + ΔW)          DoRA, the norm per output feature of the clean weight

Everything is computed in at least fp32 and returned so; the caller rounds once to the weight's dtype.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype merging computes in: the widest of the inputs, at least fp32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, *, E: torch.Tensor | None = None,
               shape: tuple[int, ...] | None = None, transposed: bool = False) -> torch.Tensor:
    """s·B·(A⊙Λ) in the base weight's layout: ``transposed`` for a weight stored in×out (GPT-2's
    Conv1D) or num×dim (an embedding table); ``shape`` to view it as a convolution's kernel. In the
    factors' own precision (fp32 for adapters on a 16-bit base)."""
    if E is not None:
        A = A * E
    delta = (B.flatten(1) @ A.flatten(1)) * scaling  # out × (in · kernel)
    if transposed:
        return delta.T
    return delta if shape is None else delta.view(shape)


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√S·Vhᵀ rows, U·√S columns) of the first ``k`` singular triplets of an update:
    B·A is its best rank-k approximation, with the scale shared evenly by the two factors."""
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


def feature_axis(transposed: bool) -> int:
    """The axis of a base weight that holds output features: 0 for out×in, 1 when stored transposed."""
    return 1 if transposed else 0


def feature_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """‖weight‖ per feature along ``axis`` (over every other axis: a convolution's input and kernel)."""
    return torch.linalg.vector_norm(weight, dim=[d for d in range(weight.dim()) if d != axis])


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """m / ‖W0 + ΔW‖, shaped to broadcast over a weight's feature axis."""
    return _along(magnitude.to(norm.dtype).flatten() / norm, axis, ndim)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor | None = None, *,
                  axis: int = 0, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` with the update folded in. DoRA (``magnitude``): ``norm`` is ‖W0 + ΔW‖ of the clean
    weight; without it, ``weight`` is taken to be clean and its own merged norm is used."""
    dtype = compute_dtype(weight, delta)
    merged = weight.to(dtype) + delta.to(dtype)
    if magnitude is None:
        return merged
    norm = feature_norm(merged, axis) if norm is None else norm
    return dora_factor(magnitude, norm, axis, merged.dim()) * merged


def unmerged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor | None = None, *,
                    axis: int = 0, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``merged_weight`` (DoRA needs the ``norm`` the merge used)."""
    dtype = compute_dtype(weight, delta)
    if magnitude is None:
        return weight.to(dtype) - delta.to(dtype)
    return weight.to(dtype) / dora_factor(magnitude, norm, axis, weight.dim()) - delta.to(dtype)
