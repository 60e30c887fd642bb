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


def check_run_fits(model_config, options, seq_len: int, nproc: int = 1) -> None:
    """Refuse, before anything is loaded, a run whose estimated memory exceeds what the machine has
    available; the message gives the estimate, the memory available and the options that would fit."""
    import dataclasses

    from ..errors import ConfigError
    from ..hub.low_memory import HEADROOM, available_bytes, human_bytes

    available = available_bytes()
    needed = estimated_bytes(model_config, options, seq_len, nproc=nproc) if available else None
    if needed is None or needed <= HEADROOM * available:
        return
    changes = {"--qlora": {"qlora": True}, "--bf16": {"bf16": True}, "--grad-checkpointing": {"grad_checkpointing": True},
               "--qlora --bf16 --grad-checkpointing": {"qlora": True, "bf16": True, "grad_checkpointing": True},
               "--batch-size 1": {"batch_size": 1}}
    fitting = []
    for flags, fields in changes.items():
        if all(getattr(options, k) == v for k, v in fields.items()) or options.full and "qlora" in fields:
            continue
        other = estimated_bytes(model_config, dataclasses.replace(options, **fields), seq_len, nproc=nproc)
        if other is not None and other <= HEADROOM * available:
            fitting.append(f"{flags} ({human_bytes(other)})")
    raise ConfigError(f"this run needs about {human_bytes(needed)} by `lorakit estimate` (weights, adapter, optimizer "
                      f"state, activations) but the machine has {human_bytes(available)} available (a run may take "
                      f"{HEADROOM:.0%} of it). " + (f"What would fit: {', '.join(fitting)}." if fitting else
                                                     "None of --qlora, --bf16, --grad-checkpointing, --batch-size 1 "
                                                     "fits either: use torchrun --fsdp over more processes or machines."))
