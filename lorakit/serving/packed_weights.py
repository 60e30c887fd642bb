"""The served fp32 base's linear weights packed for oneDNN (kernels/packed_linear.py).

torch's fp32 ``F.linear`` runs through MKL, which is slow on some CPUs: for a few rows on an AVX2
EPYC (oneDNN's packed weights 1.2-2× faster there), and at every row count on an AVX512 EPYC, where
MKL takes no AVX512 path (oneDNN 2.2-2.4×, prefill included; BENCHMARKS.md, issue 26). Which row
counts gain depends on the CPU, so ``use_packed_weights`` measures them when the engine starts
(``calibrate``, at the threads a worker runs on, once per machine: packed_calibration.py) and packs the
weights for those: for
``auto`` only where it pays and fits (an fp32 model on CPU, torch built with oneDNN, the extra copy
under half of the memory available), then checks a forward with every packed weight in use against
the unpacked model and unpacks (saying so) when they differ or it fails. It returns what it did in
one line, which ``lorakit serve`` prints at start.
"""

from __future__ import annotations

import logging

import torch

from ..hub.low_memory import available_bytes
from ..kernels.packed_linear import (ROW_STEPS, pack_linears, packed_elements, packing_available, set_packed_steps,
                                     unpack_linears)
from .checks import same_logits
from .packed_calibration import measured_steps

log = logging.getLogger("lorakit.serving")
SETTINGS = ("auto", "on", "off")  # lorakit serve --packed-weights


def use_packed_weights(model, setting: str = "auto", threads: int | None = None) -> tuple[bool, str]:
    """Pack ``model``'s fp32 linear weights per ``setting`` (auto, on, off) for the row counts where
    they measured faster on ``threads`` torch threads (default: this thread's): whether it did, and
    a line saying what it did and why."""
    if setting == "off":
        return False, "off (--packed-weights off)"
    elements = packed_elements(model, measured=True)
    if not packing_available():
        return False, "off (this torch has no oneDNN)"
    if not elements:
        return False, "off (no fp32 CPU linear weight large enough to gain)"
    extra, free = elements * 4, available_bytes()
    if setting == "auto" and free is not None and extra > free // 2:
        return False, (f"off (their {extra / 2**20:.0f} MB copy is over half of the {free / 2**20:.0f} MB "
                       "available; --packed-weights on forces them)")
    reference = next(model.parameters())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # one short sequence (a classifier without a pad token takes no batch), every packed module
    # through its packed copy for the check
    rows = 5
    ids = (torch.arange(1, rows + 1).view(1, rows) % config.vocab_size).to(reference.device)
    before_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        steps, how = measured_steps(model)
        with torch.inference_mode():
            before = model(input_ids=ids).logits
            pack_linears(model, steps={shape: frozenset(ROW_STEPS) for shape in steps})
            after = model(input_ids=ids).logits
        extra = set_packed_steps(model, steps) * 4
    except Exception as exc:  # noqa: BLE001 - any failure: keep torch's linears
        unpack_linears(model)
        log.warning("packed weights are not usable with this model (%s); serving with torch's own linears", exc)
        return False, f"off (a forward through them failed: {exc})"
    finally:
        torch.set_num_threads(before_threads)
    if not same_logits(after, before, reference.dtype):
        unpack_linears(model)
        log.warning("packed weights gave other logits for this model; serving with torch's own linears")
        return False, "off (they gave other logits for this model)"
    if not extra:
        return False, f"off (oneDNN's packed product measured no faster than torch's linears here; {how})"
    gaining = sorted(steps.items(), key=lambda item: -len(item[1]))
    where = ", ".join(f"{i}x{o}: {_steps_text(s)}" for (i, o), s in gaining)
    return True, (f"on ({extra / 2**20:.0f} MB more; oneDNN where it measured faster here, rows by weight shape: "
                  f"{where}; {how}; --packed-weights off)")


def _steps_text(steps: frozenset[int]) -> str:
    """Row steps as ranges of the row counts they stand for: {2, 4, 8} -> '2-8', {1, 2, ..., 512} -> '1-'
    (no upper end: the last step stands for every count past it), {} -> 'none'."""
    ranges: list[list[int]] = []
    for low, step in zip((1, *(before + 1 for before in ROW_STEPS)), ROW_STEPS):
        if step not in steps:
            continue
        if ranges and ranges[-1][1] == low - 1:
            ranges[-1][1] = step
        else:
            ranges.append([low, step])
    return ",".join(f"{low}-" if high == ROW_STEPS[-1] else f"{low}-{high}" if high != low else str(low)
                    for low, high in ranges) or "none"
