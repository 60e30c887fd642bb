"""Attention for a decoding step over per-row cache lengths, fp32 or bf16 on CPU (decode_attention.cpp).

In a server's decoding step every row has one new query token and its own number of cached
columns. torch's SDPA takes that as a padded 4-D mask: every row is read up to the widest row's
width (1.9× the real columns on the serving anchor workload), through a CPU flash kernel made for
many query tokens that reads the cache at 8-10 GB/s on a core that streams 37 GB/s. The kernel here
reads each row's own columns once for all the query heads that share a key/value head, bf16 ones
widened to fp32 as they are loaded (``benchmarks/decode_attention.py``, BENCHMARKS.md, issue 26).
It runs on one thread; a caller with more threads keeps SDPA (see ``MAX_THREADS``).

It is C++ compiled at first use (kernels/native.py): a machine without a compiler keeps SDPA
(``load`` says why).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..errors import LoraError
from . import native

SOURCE = Path(__file__).with_name("decode_attention.cpp")
# At 2 threads SDPA a layer still took longer than the kernel on one (0.52-0.82 against 0.42-0.68 ms,
# 24 rows); with more threads SDPA's parallel loop is left to win.
MAX_THREADS = 2


class DecodeAttention:
    """The loaded kernel: ``attend(query, key, value, lengths, longest, scale)``."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._attend = library.lorakit_decode_attention
        self._attend.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 2, ctypes.c_void_p, *[ctypes.c_int64] * 3,
                                 ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, *[ctypes.c_int64] * 2,
                                 ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int64]
        self._attend.restype = None
        self._tuned = library.lorakit_decode_attention_tuned
        self._tuned.argtypes = [ctypes.c_int64, ctypes.c_int64]
        self._tuned.restype = ctypes.c_int64
        self.vectorised = bool(library.lorakit_decode_attention_vectorised())

    @staticmethod
    def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether it runs these (batch, heads, tokens, dim) tensors: all fp32 or all bf16 on CPU, one
        query token, heads a whole multiple of the key/value heads, each head's vector contiguous."""
        heads, kv_heads = query.shape[1], key.shape[1]
        return (query.dtype == key.dtype == value.dtype and query.dtype in native.DTYPES and query.device.type == "cpu"
                and query.shape[2] == 1 and heads % kv_heads == 0
                and query.stride(3) == key.stride(3) == value.stride(3) == 1)

    def tuned(self, groups: int, dim: int) -> bool:
        """Whether it has a loop tuned for this many query heads per key head of this size (up to 8
        heads of 64, 80, 96, 128 or 256); other shapes run a plain loop."""
        return bool(self._tuned(groups, dim))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
               longest: int, scale: float) -> torch.Tensor:
        """query (rows, heads, 1, dim); key, value (rows, kv_heads, columns, dim), as ``supports``
        takes them; row r attends to its first ``lengths[r]`` columns (int64, contiguous; ``longest``
        their maximum, at most the columns: checked once by the caller, not per layer). Returns
        (rows, 1, heads, dim), what transformers' attention functions return."""
        rows, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        if lengths.dtype != torch.int64 or not lengths.is_contiguous() or len(lengths) != rows or longest > key.shape[2]:
            raise LoraError(f"decode attention needs {rows} contiguous int64 lengths of at most {key.shape[2]} columns")
        out = torch.empty(rows, 1, heads, dim, dtype=query.dtype)
        self._attend(query.data_ptr(), query.stride(0), query.stride(1),
                     key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
                     value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
                     out.data_ptr(), out.stride(0), out.stride(2),
                     lengths.data_ptr(), rows, kv_heads, heads // kv_heads, dim, scale, query.dtype == torch.bfloat16)
        return out


def library_name() -> str:
    """The cached library's file name (native.library_name)."""
    return native.library_name(SOURCE)


@functools.cache
def load(folder: str) -> tuple[DecodeAttention | None, str]:
    """The kernel, built into ``folder`` if it is not there yet, or None and why not."""
    library, path, how = native.build(SOURCE, folder)
    return (DecodeAttention(library, path) if library is not None else None), how
