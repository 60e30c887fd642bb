"""What the CPU can do natively, read once from /proc/cpuinfo: whether bf16 matrix products run on
a bf16 unit or are emulated. Where emulated (an AVX2-only CPU), a bf16 product is 7-70x slower than
the same values multiplied in fp32 (BENCHMARKS.md, QLoRA on CPU), so 16-bit kernels upcast there."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_UNITS = ("amx_bf16", "avx512_bf16")  # CPU flags of native bf16 matrix instructions


def cpuinfo_value(key: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first ``key : value`` line of /proc/cpuinfo (``flags``, ``model name``), or None where
    there is none (or not Linux)."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(cpuinfo).read_text().splitlines()
                     if line.split(":", 1)[0].strip() == key), None)
    except OSError:
        return None


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's native bf16 matrix unit (AMX-BF16 or AVX512-BF16), or None (or not Linux): where
    there is one, bf16 matmuls run 2-3x fp32's (BENCHMARKS.md, issue 26); elsewhere bf16 is emulated
    and slower than fp32."""
    flags = (cpuinfo_value("flags", cpuinfo) or "").split()
    return next((unit for unit in BF16_UNITS if unit in flags), None)


@functools.cache
def _this_cpu_has_native_bf16() -> bool:
    return native_bf16() is not None


def emulated_bf16(x: torch.Tensor) -> bool:
    """Whether a bf16 product of ``x`` would run emulated: bf16 on a CPU without a bf16 unit."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _this_cpu_has_native_bf16()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in ``x``'s dtype, in fp32 where that is emulated bf16 (as ``matmul``)."""
    if emulated_bf16(x):
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.matmul(a, b, out=out)``, except that bf16 CPU operands on a CPU without a bf16 unit are
    multiplied in fp32 (outside autocast, which would cast them back) and the product rounded back to
    bf16: the same operand values and fp32 accumulation as torch's own bf16 product, at fp32's speed
    (an SmolLM2 projection's backward product at 182 rows on an AVX2 EPYC: 140-280 ms in bf16, 2.5-4
    ms so)."""
    if emulated_bf16(a):
        with torch.autocast("cpu", enabled=False):
            product = (a.float() @ b.float()).to(torch.bfloat16)
        return product if out is None else out.copy_(product)
    return torch.matmul(a, b, out=out)
