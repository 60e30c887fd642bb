"""The served fp32 base's linear weights packed for small batches (kernels/packed_linear.py).

A server's decoding steps multiply a few rows at a time, where torch's MKL path is slow on some CPUs
and oneDNN's packed weights are 1.2-2× faster (BENCHMARKS.md, issue 26). ``use_packed_weights``
packs them when the engine starts: for ``auto`` only where it pays and fits (an fp32 model on CPU,
torch built with oneDNN, the extra copy under half of the memory available), then checks one
small-batch forward against the unpacked model and unpacks (saying so) when they differ or it
fails. It returns what it did in one line, which ``lorakit serve`` prints at start.
"""

from __future__ import annotations

import logging

import torch

from ..hub.low_memory import available_bytes
from ..kernels.packed_linear import ROWS, pack_linears, packed_elements, packing_available, unpack_linears
from .checks import same_logits

log = logging.getLogger("lorakit.serving")
SETTINGS = ("auto", "on", "off")  # lorakit serve --packed-weights


def use_packed_weights(model, setting: str = "auto") -> tuple[bool, str]:
    """Pack ``model``'s fp32 linear weights per ``setting`` (auto, on, off): whether it did, and
    a line saying what it did and why."""
    if setting == "off":
        return False, "off (--packed-weights off)"
    elements = packed_elements(model)
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
    # one sequence (a classifier without a pad token takes no batch) of a length that every packed
    # module multiplies through its packed copy
    rows = ROWS[0]
    ids = (torch.arange(1, rows + 1).view(1, rows) % config.vocab_size).to(reference.device)
    try:
        with torch.inference_mode():
            before = model(input_ids=ids).logits
            pack_linears(model)
            after = model(input_ids=ids).logits
    except Exception as exc:  # noqa: BLE001 - any failure: keep torch's linears
        unpack_linears(model)
        log.warning("packed weights are not usable with this model (%s); serving with torch's own linears", exc)
        return False, f"off (a forward through them failed: {exc})"
    if not same_logits(after, before, reference.dtype):
        unpack_linears(model)
        log.warning("packed weights gave other logits for this model; serving with torch's own linears")
        return False, "off (they gave other logits for this model)"
    return True, f"on ({extra / 2**20:.0f} MB more: decoding steps' linears through oneDNN; --packed-weights off)"
