"""`lorakit combine`: several saved adapters of one base model into one PEFT-format adapter.

The adapters are loaded onto their base model and combined with ``lk.add_weighted_adapter`` (PEFT's
combination types), and the result is written like any adapter. Everything that can be wrong with
the inputs (another base, another adapter type, DoRA, a bad density) is found before the model is
loaded, and nothing is written unless the whole combination succeeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lorakit as lk

from ..config import LoraConfig
from ..errors import ConfigError
from ..hub.models import load_model
from ..io.atomic import staged_directory
from ..io.checkpoint import read_adapter
from ..io.peft_format import CONFIG_FILE
from ..io.runs import RUN_FILE, read_run
from ..model.combining import check_combinable, check_combination

COMBINED = "combined"


def _read(directory: Path) -> LoraConfig:
    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"{directory} is not an adapter directory (no {CONFIG_FILE}); pass the directories "
                          "`lorakit train` wrote (their adapter/ folder or the run folder).")
    return read_adapter(directory)[0]  # weights readable, config valid: before loading a model


def _adapter_dir(path: str) -> Path:
    candidate = Path(path)
    return candidate / "adapter" if (candidate / "adapter" / "adapter_config.json").is_file() else candidate


def check_inputs(directories: list[Path], weights: list[float], method: str, density: float | None,
                 majority_sign_method: str = "total") -> list[LoraConfig]:
    """The adapters' configs, after every check that needs no model."""
    if len(directories) < 2:
        raise ConfigError("give at least two adapters to combine.")
    check_combination(method, len(directories), len(weights), density, majority_sign_method)
    configs = [_read(d) for d in directories]
    first = configs[0]
    def identity(config: LoraConfig) -> dict:
        return {"peft_type": config.PEFT_TYPE, "base_model_name_or_path": config.base_model_name_or_path,
                "task_type": config.task_type}

    for directory, config in zip(directories[1:], configs[1:]):
        for field, value in identity(config).items():
            if value != identity(first)[field]:
                raise ConfigError(f"{directories[0]} and {directory} differ in {field} ({identity(first)[field]!r} vs "
                                  f"{value!r}): only adapters of one type, trained on one base model for one task, "
                                  "can be combined.")
    check_combinable([str(d) for d in directories], configs)
    return configs


def combine_adapters(paths: list[str], weights: list[float], output: str, method: str = "svd",
                     density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                     base_model: str | None = None, overwrite: bool = False) -> dict:
    directories = [_adapter_dir(p) for p in paths]
    check_inputs(directories, weights, method, density, majority_sign_method)
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {target} is not empty; pass --overwrite or choose another --output")
    try:
        _, record = read_run(directories[0])
    except ConfigError:
        record = None
    if record is None and not base_model:
        raise ConfigError(f"{directories[0]} was not written by `lorakit train`; pass --base MODEL (the base model "
                          "the adapters were trained on).")
    if record is not None and record.get("full"):
        raise ConfigError(f"{directories[0]} is a full fine-tune, not an adapter.")
    task = record["task"] if record else "lm"
    model, _ = load_model(base_model or record["model"], task, record.get("labels") if record else None,
                          head_from_adapter=True)
    names = [f"adapter_{i}" for i in range(len(directories))]
    for name, directory in zip(names, directories):
        lk.load_adapter(model, directory, name)
    lk.add_weighted_adapter(model, names, weights, COMBINED, combination_type=method, density=density,
                            majority_sign_method=majority_sign_method, svd_rank=svd_rank)
    with staged_directory(target) as staging:
        lk.save_adapter(model, staging, adapter_name=COMBINED)
        if record is not None:  # `lorakit eval` / `predict` / `merge` then work on the result as on a run
            shutil.copyfile(directories[0] / RUN_FILE, staging / RUN_FILE)
    new_config = json.loads((target / CONFIG_FILE).read_text())
    return {"output": str(target), "method": method, "adapters": [str(d) for d in directories], "weights": weights,
            "density": density, "r": new_config["r"],
            "adapter_bytes": sum(f.stat().st_size for f in target.glob("adapter_*"))}
