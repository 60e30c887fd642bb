"""Where packed weights pay on this machine, measured once and kept (kernels/packed_linear.py).

``calibrate`` times torch's linear against oneDNN's packed product for every weight shape at every
row step: 4-5 s for SmolLM2-135M's shapes and 33 s for LLaMA-7B's on one thread of the AVX2 EPYC,
paid at every server start, and on a shared machine a start under load could pack other row
counts than the last one (BENCHMARKS.md, issue 26). So its results are kept in one JSON file in
lorakit's cache directory, per machine (CPU model and flags, torch version, threads, the
calibration's own settings) and weight shape; a later start measures only shapes it has not seen.
Delete the file to measure again. A file that cannot be read is measured over; one that cannot be
written costs only the next start's time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..hub.models import cache_dir
from ..io.atomic import staged_file
from ..kernels import packed_linear
from ..kernels.cpu import cpuinfo_value
from ..kernels.native import cpu_flags

log = logging.getLogger("lorakit.serving")
FILE = "packed-weights.json"

Steps = dict[tuple[int, int], frozenset[int]]


def calibration_file() -> Path:
    return cache_dir() / FILE


def machine_key() -> str:
    """What a measurement holds for: the CPU, torch (its MKL and oneDNN), this thread's torch
    threads, and the calibration's settings (a change to them measures again)."""
    cpu = hashlib.sha256(f"{cpuinfo_value('model name')}|{cpu_flags()}".encode()).hexdigest()[:16]
    return (f"cpu={cpu} torch={torch.__version__} threads={torch.get_num_threads()} "
            f"gain={packed_linear.CALIBRATE_GAIN} steps={','.join(map(str, packed_linear.ROW_STEPS))}")


def measured_steps(model) -> tuple[Steps, str]:
    """``calibrate``'s row steps for each weight shape of ``model`` on this thread's torch threads:
    those measured before on this machine from the file, the rest measured now and added to it;
    and a few words saying which."""
    path, key = calibration_file(), machine_key()
    everything = _read(path)
    kept = everything.get(key, {})
    known = {}
    for shape in packed_linear.calibrated_shapes(model):
        steps = kept.get(f"{shape[0]}x{shape[1]}")
        if isinstance(steps, list) and all(step in packed_linear.ROW_STEPS for step in steps):
            known[shape] = frozenset(steps)
    new = packed_linear.calibrate(model, skip=frozenset(known))
    if not new:
        return known, f"as measured here before, kept in {path}: delete it to measure again"
    kept = {**kept, **{f"{i}x{o}": sorted(steps) for (i, o), steps in new.items()}}
    try:
        with staged_file(path) as staging:
            Path(staging).write_text(json.dumps({**everything, key: kept}, indent=1, sort_keys=True))
        how = f"measured now, kept in {path}"
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
        log.warning("could not keep the packed-weights calibration in %s (%s); the next start measures again",
                    path, exc)
        how = "measured now"
    return {**known, **new}, how


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}
