"""The LoRA term of a decoding step over mixed adapters on CPU, fp32 or bf16 (mixed_lora.cpp).

In a server's decoding step each row has one token and its own adapter. torch's path multiplies by
every loaded adapter side by side and masks each row's own columns (model/mixed.py,
``MixedRows.concatenated``): two small GEMMs a layer whose fixed costs outweigh their work. The
kernel reads only each row's own A and B (``benchmarks/mixed_lora.py``, BENCHMARKS.md, issue 26).
One thread; C++ compiled at first use (kernels/native.py); without a compiler the GEMMs stay.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..errors import LoraError
from . import native

SOURCE = Path(__file__).with_name("mixed_lora.cpp")


class MixedLora:
    """The loaded kernel: ``add(result, x, A, B, slots)``."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._add = library.lorakit_mixed_lora
        self._add.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                              *[ctypes.c_int64] * 2, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 2]
        self._add.restype = None
        self.max_rank = library.lorakit_mixed_lora_max_rank()

    def supports(self, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor) -> bool:
        """Whether it runs these 2-D tensors: one dtype of ``native.DTYPES`` on CPU, rows contiguous, and
        a rank it holds."""
        return (result.dtype == x.dtype == A.dtype and x.dtype in native.DTYPES and x.device.type == "cpu"
                and result.dim() == x.dim() == 2 and result.stride(1) == x.stride(1) == 1
                and A.shape[1] <= self.max_rank)

    def add(self, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
        """result[i] += B[slots[i]] @ A[slots[i]] @ x[i] in place, for rows with slots[i] >= 0.
        result (rows, out), x (rows, in) as ``supports`` takes them; A (slots, r, in) and B (slots,
        r, out) contiguous in x's dtype; slots contiguous int64, each below A's slots (as
        ``MixedRows.per_slot`` builds them). ``torch_reference`` computes the same with torch."""
        rows, in_dim = x.shape
        # checked on every call of 120 layers a step, so only what the stacks' own build does not fix
        if (A.shape[2] != in_dim or B.shape[:2] != A.shape[:2] or B.shape[2] != result.shape[1] or len(slots) != rows
                or result.shape[0] != rows):
            raise LoraError(f"mixed LoRA kernel: shapes do not fit (x {tuple(x.shape)}, A {tuple(A.shape)}, "
                            f"B {tuple(B.shape)}, slots {tuple(slots.shape)}, result {tuple(result.shape)})")
        rank = A.shape[1]
        self._add(x.data_ptr(), x.stride(0), rows, in_dim, A.data_ptr(), B.data_ptr(), rank, result.shape[1],
                  slots.data_ptr(), result.data_ptr(), result.stride(0), x.dtype == torch.bfloat16)
        return result


def torch_reference(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
    """What ``MixedLora.add`` computes, with torch, row by row, into a new tensor: the r-wide
    intermediate rounded to x's dtype, as two GEMMs in that dtype round it."""
    expected = result.float().clone()
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            h = (A[slot].float() @ x[row].float()).to(x.dtype).float()
            expected[row] += B[slot].float().T @ h
    return expected.to(result.dtype)


@functools.cache
def load(folder: str) -> tuple[MixedLora | None, str]:
    """The kernel, built into ``folder`` if it is not there yet, or None and why not."""
    library, path, how = native.build(SOURCE, folder)
    return (MixedLora(library, path) if library is not None else None), how
