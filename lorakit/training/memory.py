"""A run's memory next to `lorakit estimate`'s prediction for the same options (lm / sft runs).

Measured: on CUDA the allocator's peak; on CPU the process's peak resident memory above its
resident memory just before the model was loaded, over the whole run and over training alone
(from the first step: loading, which materialises the whole model in every process, excluded) (the same measure benchmarks/estimate_memory.py
checks the estimate against). The estimate is built from the model's config alone with the run's
rank, targets, dtype, optimizer, batch, sequence length and checkpointing.
"""

from __future__ import annotations

import resource

import torch

from ..errors import LoraError


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_bytes(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from here (training, after loading): CUDA's counter, or on Linux the
    process's resident high-water mark (``/proc/self/clear_refs``); False where neither exists."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_since_reset(device: torch.device, baseline: int) -> int:
    """The peak since reset_peak, above ``baseline`` (the resident memory before the model was loaded)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as handle:
        kilobytes = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return kilobytes * 1024 - baseline


def estimated_bytes(model_config, options, seq_len: int, chunked_loss: bool = True, nproc: int = 1) -> int | None:
    """The estimate's total for this run, or None where its memory model does not apply (a classifier
    head, AdaLoRA, Adafactor)."""
    from ..tools.estimate import OPTIMIZER_STATES, estimate

    if options.task == "classify" or options.method != "lora" or options.optim not in OPTIMIZER_STATES:
        return None
    try:
        result = estimate(model_config, adapter=options.lora_config(), dtype="bf16" if options.bf16 else "fp32",
                          optimizer=options.optim, batch_size=options.batch_size, seq_len=seq_len,
                          grad_checkpointing=options.grad_checkpointing, attention="sdpa", chunked_loss=chunked_loss,
                          nproc=nproc, fsdp=options.fsdp, task=options.task, num_generations=options.num_generations)
    except LoraError:
        return None
    method = "full" if options.full else "qlora" if options.qlora else "lora"
    return next(row.total for row in result.memory if row.method == method)
