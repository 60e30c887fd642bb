"""What caches of values computed from tensors (stacked adapters, DoRA's weight norms) key on.

Every in-place change of a tensor bumps its version counter, so (storage, version) tells a cached
result from a stale one. Tensors created under ``torch.inference_mode`` have no version counter
(reading it raises) and can only change in place inside inference mode: they count as unchanged,
so a cache over them must be cleared by whoever writes them there.
"""

from __future__ import annotations

import operator

import torch

_VERSION = operator.attrgetter("_version")


def tracked(tensors) -> list[torch.Tensor]:
    """The tensors whose in-place changes can be seen (all but inference tensors)."""
    return [t for t in tensors if not t.is_inference()]


def versions(tensors: list[torch.Tensor]) -> list[int]:
    """The version counters of ``tracked`` tensors, read in one C-level map: a cache over many
    tensors checks them on every use (a server's mixed batch, at every decoding step)."""
    return list(map(_VERSION, tensors))


def change_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, version): equal while the tensor holds the same values in the same place."""
    return tensor.data_ptr(), (-1 if tensor.is_inference() else tensor._version)
