"""Task-vector algebra for combining adapters: TIES, DARE, magnitude pruning, plain weighted sums.

Each function takes the same tensor from several adapters (a list of equal-shaped task tensors)
and one weight per adapter, and returns one tensor. The semantics are PEFT's ``merge_utils``:

  magnitude_prune  keep each tensor's top ``density`` share of entries by |value|, then Σ w·t
  ties             magnitude-prune, elect a sign per entry (Σ of values, or of signs with
                   "frequency"), average the weighted entries that agree with it (Yadav et al. 2023)
  dare_linear      keep each entry with probability ``density`` and rescale by 1/density, then Σ w·t
                   (Yu et al. 2023)
  dare_ties        DARE's random drop, then TIES' sign election and disjoint mean

The random drop draws ``torch.bernoulli`` over a tensor shaped like each task tensor, one tensor
after another, from torch's global generator: the same draws PEFT makes, so a seeded run equals
PEFT's seeded run when the tensors come in the same order.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("linear", *PRUNING_METHODS)
SIGN_METHODS = ("total", "frequency")


def check_density(method: str, density: float | None) -> None:
    """A clear error for a missing or out-of-range density, before anything is built."""
    if method not in PRUNING_METHODS:
        return
    if density is None:
        raise ConfigError(f"combination {method!r} prunes each adapter's update: pass density in (0, 1], "
                          "the share of entries to keep (0.5 is a common start).")
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1] (the share of entries each adapter keeps), got {density}.")


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density·numel) entries of largest |value|."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def prune_randomly(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE), so the
    expected tensor is unchanged."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """True where an adapter's entry has the sign elected for that entry across adapters (dim 0)."""
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}.")
    return sign == torch.where(votes >= 0, 1, -1)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))


def combine_tensors(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
                    majority_sign_method: str = "total") -> torch.Tensor:
    """One tensor from ``tensors`` (one per adapter) by ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {METHODS}.")
    check_density(method, density)
    if method in ("ties", "magnitude_prune"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [prune_randomly(t, density) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if method in ("ties", "dare_ties"):
        agrees = majority_sign_mask(stacked, majority_sign_method)
        kept = (_weighted(stacked, weights) * agrees).sum(dim=0)
        return kept / agrees.sum(dim=0).clamp(min=1)
    return _weighted(stacked, weights).sum(dim=0)
