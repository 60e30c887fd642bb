"""Decoding steps' LoRA term through lorakit's kernel (kernels/mixed_lora.py) on a CPU model.

A decoding step over rows of different adapters multiplies, in every LoRA layer, each row by its
own adapter. torch's path does it as two GEMMs over all loaded adapters side by side with a mask
(model/mixed.py); the kernel reads each row's own A and B, with none of the GEMMs' fixed costs.
The engine hands it to ``lk.mixed_batch`` for forwards on at most ``MAX_THREADS`` threads (its
workers run one each); ``use_lora_kernel`` builds it (once per machine) and checks its sums against
torch's on this model's dtype first, or keeps torch's GEMMs and says why.
"""

from __future__ import annotations

import logging

import torch

from ..hub.models import cache_dir
from ..kernels import native
from ..kernels.mixed_lora import MixedLora, load, torch_reference

log = logging.getLogger("lorakit.serving")
SETTINGS = ("auto", "off")
MAX_THREADS = 2  # one thread runs it; measured against torch's GEMMs on up to two


def lora_kernel_for_threads(kernel: MixedLora | None) -> MixedLora | None:
    """``kernel`` for a forward on this thread's torch threads, None on more than MAX_THREADS."""
    return kernel if kernel is not None and torch.get_num_threads() <= MAX_THREADS else None


def use_lora_kernel(model, setting: str = "auto") -> tuple[MixedLora | None, str]:
    """The kernel the engine's mixed decoding steps use on ``model`` (None: torch's GEMMs), and a line
    saying so."""
    if setting == "off":
        return None, "torch's GEMMs (--lora-kernel off)"
    refused = native.refusal(model)
    if refused:
        return None, f"torch's GEMMs ({refused})"
    kernel, how = load(str(cache_dir() / "kernels"))
    if kernel is None:
        log.warning("the mixed LoRA kernel is not usable here: %s; adapters' decoding steps use torch's GEMMs", how)
        return None, f"torch's GEMMs (the kernel: {how})"
    if not kernel_equals_torch(kernel, next(model.parameters()).dtype):
        log.warning("the mixed LoRA kernel's sums differ from torch's here; adapters' decoding steps use torch's GEMMs")
        return None, "torch's GEMMs (the kernel's sums differ from torch's on this CPU)"
    return kernel, (f"lorakit's kernel, each row through its own adapter (forwards on up to {MAX_THREADS} "
                    "threads; --lora-kernel off for torch's GEMMs)")


def kernel_equals_torch(kernel: MixedLora, dtype: torch.dtype) -> bool:
    """Random stacks of four adapters, five rows (one on the base): the kernel's result against
    torch's in ``dtype`` (kernels.mixed_lora.torch_reference)."""
    gen = torch.Generator().manual_seed(0)
    slots_, rank, in_dim, out = 4, 8, 72, 100  # widths off the kernel's 16-lane blocks: the tails run too
    A = torch.randn(slots_, rank, in_dim, generator=gen).to(dtype)
    B = (torch.randn(slots_, rank, out, generator=gen) * 0.1).to(dtype)
    x = torch.randn(5, in_dim, generator=gen).to(dtype)
    start = torch.randn(5, out, generator=gen).to(dtype)
    slots = torch.tensor([1, -1, 3, 2, 1])
    got = kernel.add(start.clone(), x, A, B, slots).float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got, torch_reference(start, x, A, B, slots).float(), rtol=tolerance, atol=tolerance))
