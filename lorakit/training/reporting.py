"""Experiment logs: train_log.jsonl's records (strict JSON), and `--report-to tensorboard`'s
TensorBoard event files (torch.utils.tensorboard's SummaryWriter) under OUTPUT/tensorboard."""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite_or_none(value):
    """``value`` with every NaN / infinity inside it replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_record(record: dict, **kwargs) -> str:
    """Strict JSON (what every JSON reader accepts): a non-finite number is written as null."""
    return json.dumps(finite_or_none(record), allow_nan=False, **kwargs)


class Reporter:
    def __init__(self, output: Path | None, backend: str | None):
        self.writer = None
        if output is not None and backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
