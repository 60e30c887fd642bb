"""Experiment logs beside train_log.jsonl: `--report-to tensorboard` writes TensorBoard event files
(torch.utils.tensorboard's SummaryWriter) under OUTPUT/tensorboard."""

from __future__ import annotations

from pathlib import Path


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
