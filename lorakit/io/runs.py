"""What a finished run leaves behind, the record that lets `eval` / `predict` / `merge` load it again
(``hub.models.load_trained``).

A LoRA run writes a PEFT-format adapter directory; a full fine-tune writes a transformers model
directory. Both carry `lorakit_run.json` (task, base model, label names, columns, templates) so that
later commands rebuild the same model and encoding without repeating the options.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

RUN_FILE = "lorakit_run.json"


# preference / RL objectives train a causal chat model, which generate, eval and serve use as they use
# an sft run's; the record keeps the objective beside it
OBJECTIVE_TASKS = ("dpo", "orpo", "kto", "grpo")


def run_record(options, labels: list[str] | None, seq_len: int, prompt_template, response_template) -> dict:
    objective = options.task in OBJECTIVE_TASKS
    return {"task": "sft" if objective else options.task, "objective": options.task if objective else None,
            "model": options.model, "data": options.data, "labels": labels,
            "seq_len": seq_len, "text_column": options.text_column, "label_column": options.label_column,
            "prompt_template": prompt_template, "response_template": response_template,
            "full": options.full, "bf16": options.bf16, "qlora": options.qlora}


def read_run(path: str | Path) -> tuple[Path, dict]:
    """(artifact directory, record) from a run directory or the adapter/model directory inside it."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "model"):
        if (candidate / RUN_FILE).is_file():
            return candidate, json.loads((candidate / RUN_FILE).read_text())
    raise ConfigError(f"{path} is not a lorakit run: no {RUN_FILE} in it or in its adapter/ or model/ folder "
                      f"(train with `lorakit train` first)")


def trained_on_4bit(directory: str | Path) -> bool:
    """Whether the run record next to an adapter says it was trained with QLoRA (on the NF4 base); a PEFT
    adapter with no lorakit record was not."""
    try:
        return bool(read_run(directory)[1].get("qlora"))
    except ConfigError:
        return False
