"""How a serving speed-up proves itself on a model before the engine uses it (grouped attention,
the slot cache, packed weights): the logits it gives equal the model's own within the rounding of
the model's dtype."""

from __future__ import annotations

import torch


def same_logits(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` equals ``expected`` up to ``dtype``'s rounding, relative to the largest logit
    (at least 1): fp32 1e-4, 16-bit 2e-2."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    got, expected = got.float(), expected.float()
    return bool((got - expected).abs().max() <= tolerance * expected.abs().max().clamp_min(1.0))
