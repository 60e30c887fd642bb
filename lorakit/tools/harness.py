"""`lorakit eval RUN --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on the base + adapter,
in-process and unmerged (lm-eval's HFLM is handed the adapted transformers model), and with
`--compare-base` on the same model with its adapters switched off.

Tasks are lm-eval's: its bundled ones by name (they download their data from the Hugging Face hub,
so they need a connection, or HF_DATASETS_OFFLINE with a filled cache), or YAML task files of your
own in a directory given as `--lm-eval-include DIR` (lm-eval's include_path), e.g. a task over local
JSON files (`dataset_path: json`, `dataset_kwargs: {data_files: {test: FILE}}`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..errors import ConfigError


def task_names(tasks) -> list[str]:
    items = tasks if isinstance(tasks, (list, tuple)) else re.split(r"[,\s]+", str(tasks))
    names = [item.strip() for item in items if item and item.strip()]
    if not names:
        raise ConfigError("--lm-eval needs at least one task name, e.g. --lm-eval hellaswag,arc_easy")
    return names


def task_manager(names: list[str], include: str | Path | None):
    """lm-eval's TaskManager, with every name checked (a ConfigError saying where it looked)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'lorakit[lm-eval]' "
                          "(or pip install lm-eval)")
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"--lm-eval-include {include} is not a directory of lm-eval task YAML files")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None)
    missing = [name for name in names if name not in manager.all_tasks]
    if missing:
        where = f"lm-eval's {len(manager.all_tasks)} bundled tasks and groups"
        where += f" and the YAML files under {include}" if include else " (no --lm-eval-include directory)"
        raise ConfigError(f"lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found: looked in "
                          f"{where}; `lm-eval ls tasks` lists the bundled names")
    return manager


def _metrics(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results, its ",none" filter suffix dropped."""
    out = {}
    for task, values in results["results"].items():
        out[task] = {key.removesuffix(",none"): value for key, value in values.items()
                     if key != "alias" and isinstance(value, (int, float))}
    return out


def run_lm_eval(run: str | Path, tasks, include: str | Path | None = None, compare_base: bool = False,
                limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                apply_chat_template: bool = False, dtype=None) -> dict:
    """{"tasks": {task: {"adapter": metrics, "base": metrics (with compare_base)}}, ...}."""
    names = task_names(tasks)
    manager = task_manager(names, include)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    import lorakit as lk

    from ..hub.models import load_trained

    model, tokenizer, record = load_trained(run, dtype=dtype)
    if record.get("task") == "classify" or not hasattr(model, "generate"):
        raise ConfigError(f"{run} is a classifier; lm-eval evaluates causal language models (sft / lm runs)")
    model.eval()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def evaluate() -> dict:
        results = lm_eval.simple_evaluate(model=harness, tasks=names, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                          log_samples=False, verbosity="ERROR")
        return _metrics(results)

    adapted = evaluate()
    base = None
    if compare_base:
        with lk.disable_adapters(model):
            base = evaluate()
    table = {task: {"adapter": metrics, **({"base": base[task]} if base else {})} for task, metrics in adapted.items()}
    return {"run": str(run), "tasks": table, "limit": limit, "num_fewshot": num_fewshot,
            "apply_chat_template": apply_chat_template}
