"""Experiment logs: train_log.jsonl's records (strict JSON), and the `--report-to` trackers
(training/trackers.py) every scalar goes to."""

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
    """The run's trackers behind one interface (none on processes other than rank 0)."""

    def __init__(self, output: Path | None, report_to):
        from .trackers import open_trackers

        self.trackers = open_trackers(Path(output), report_to) if output is not None else []

    def start(self, params: dict) -> None:
        for tracker in self.trackers:
            tracker.start(params)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def finish(self, summary: dict, files: list[Path]) -> None:
        """The test metrics (at the run's last step) and the run's files, once it has written them."""
        from .trackers import numeric_metrics

        metrics = numeric_metrics({"test": summary.get("test"), "train_seconds": summary.get("train_seconds")}, "")
        for tracker in self.trackers:
            tracker.finish(summary["steps"], metrics, files)

    def close(self, ok: bool = True) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(ok)
