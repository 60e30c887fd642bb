"""What a finished run leaves behind, and how `eval` / `predict` / `merge` load it again.

A LoRA run writes a PEFT-format adapter directory; a full fine-tune writes a transformers model
directory. Both carry `lorakit_run.json` (task, base model, label names, columns, templates) so that
later commands rebuild the same model and encoding without repeating the options.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

RUN_FILE = "lorakit_run.json"


def run_record(options, labels: list[str] | None, seq_len: int, prompt_template, response_template) -> dict:
    return {"task": options.task, "model": options.model, "data": options.data, "labels": labels,
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


def load_trained(path: str | Path, base_model: str | None = None):
    """(model, tokenizer, record) with the trained adapter loaded (or the fully fine-tuned model)."""
    import lorakit as lk

    from .models import load_model

    directory, record = read_run(path)
    if record["full"]:
        model, tokenizer = load_model(str(directory), record["task"], record["labels"])
    else:
        model, tokenizer = load_model(base_model or record["model"], record["task"], record["labels"],
                                      head_from_adapter=True)
        if record.get("qlora"):  # the adapter was trained on the 4-bit base: evaluate on the same one
            import torch

            lk.quantize(model, compute_dtype=torch.bfloat16 if record.get("bf16") else torch.float32)
        lk.load_adapter(model, directory)
    model.eval()
    return model, tokenizer, record
