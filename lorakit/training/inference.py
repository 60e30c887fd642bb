"""Using a trained run: evaluate it, predict labels, generate text, export a merged model."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit as lk

from ..errors import ConfigError
from ..hub.models import load_model, load_trained
from ..io.atomic import staged_directory
from .data import EMBEDDED_SFT_TEMPLATES, SPLITS, encode, load_splits, prompt_text, read_file_rows, require_rows
from .evaluation import split_metrics


def load_for_eval(run: str | None, model_name: str | None, task: str | None, data: str | None, labels=None,
                  dtype=None):
    """A trained run, or a plain base model (for zero-shot baselines) described by --model/--task."""
    if run:
        return load_trained(run, dtype=dtype)
    if not (model_name and task):
        raise ConfigError("give a trained run directory, or --model and --task to evaluate a base model as is")
    if task == "classify" and not labels:
        raise ConfigError("evaluating an untrained classifier makes no sense: its head is random; train first")
    model, tokenizer = load_model(model_name, task, labels, dtype=dtype)
    templates = EMBEDDED_SFT_TEMPLATES.get(data, (None, None)) if task == "sft" else (None, None)
    record = {"task": task, "model": model_name, "labels": labels, "seq_len": 512, "text_column": "text",
              "label_column": "label", "prompt_template": templates[0], "response_template": templates[1]}
    model.eval()
    return model, tokenizer, record


def evaluate_run(run: str | None = None, data: str | None = None, split: str | None = None, *, model_name=None,
                 task=None, seed: int = 0, limit: int | None = None, batch_size: int = 32, bf16: bool = False,
                 text_column=None, label_column=None, prompt_template=None, response_template=None) -> dict:
    """Metrics of a run (or a base model) on ``data``: a single file given here is evaluated whole
    (every row, in order) unless ``split`` asks for one of its 80/10/10 training splits; embedded
    data and split directories use ``split`` (default: test)."""
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    model, tokenizer, record = load_for_eval(run, model_name, task, data)
    whole_file = read_file_rows(data) if data and split is None else None
    data = data or record.get("data")
    if not data:
        raise ConfigError("give --data: this run does not record which data it was trained on")
    split = split or "test"
    rows = whole_file if whole_file is not None else load_splits(data, seed)[split]
    if whole_file is not None:
        split = "all"
    rows = rows[:limit] if limit else rows
    require_rows(rows, split, data)
    text_column = text_column or record["text_column"]
    label_column = label_column or record["label_column"]
    templates = (prompt_template or record.get("prompt_template"), response_template or record.get("response_template"))
    if record["task"] == "classify" and label_column not in rows[0]:
        raise ConfigError(f"the {split} split of {data} has no label column {label_column!r} (columns: "
                          f"{', '.join(rows[0])}); metrics need labels — use `lorakit predict` for unlabelled data")
    examples = encode(rows, tokenizer, record["task"], record["seq_len"], split, text_column=text_column,
                      label_column=label_column, labels=record["labels"], prompt_template=templates[0],
                      response_template=templates[1])
    metrics = split_metrics(model, tokenizer, record["task"], examples, rows, record["labels"], templates,
                            batch_size, bf16)
    metrics.update({"run": run, "model": record["model"], "data": data, "split": split, "task": record["task"]})
    return metrics


@torch.no_grad()
def predict(run: str, texts: list[str], batch_size: int = 32, max_new_tokens: int = 64) -> list[dict]:
    """Labels with probabilities for a classifier run; generated replies for sft / lm runs."""
    model, tokenizer, record = load_trained(run)
    if record["task"] != "classify":
        return [{"text": t, "reply": r} for t, r in zip(texts, generate(model, tokenizer, texts, record, max_new_tokens))]
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=record["seq_len"], padding=True, return_tensors="pt")
        probs = model(**enc).logits.float().softmax(-1)
        for text, row in zip(chunk, probs):
            results.append({"text": text, "label": record["labels"][int(row.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(record["labels"], row)}})
    return results


@torch.no_grad()
def computing_in(model):
    """bf16 autocast where part of the model computes in bf16 (a bf16 base, or a QLoRA base with
    bf16 compute next to fp32 embeddings, as trained): without it the two dtypes meet in attention."""
    from ..kernels.nf4 import Linear4bit

    bf16 = any(isinstance(m, Linear4bit) and m.compute_dtype == torch.bfloat16 for m in model.modules()) or \
        next(model.parameters()).dtype == torch.bfloat16
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)


def generate(model, tokenizer, prompts: list[str], record: dict, max_new_tokens: int = 64,
             temperature: float = 0.0) -> list[str]:
    """Greedy (or sampled) continuations; sft runs wrap each prompt in the chat template as trained."""
    if record["task"] == "sft":
        template = record.get("prompt_template")
        texts = [prompt_text(tokenizer, [{"role": "user", "content": template.format(text=p) if template and "{text}" in template else p}])
                 for p in prompts]
    else:
        texts = prompts
    replies = []
    for text in texts:  # one at a time: no padding, so results do not depend on batch mates
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=record["task"] != "sft")
        with computing_in(model):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def merge_run(run: str, output: str, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Fold the adapter into the base weights and save a plain transformers model (no lorakit needed)."""
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {target} is not empty; pass --overwrite or choose another --output")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
    model, tokenizer, record = load_trained(run)
    if record["full"]:
        raise ConfigError(f"{run} is a full fine-tune: its model/ directory is already a plain transformers model")
    if record.get("qlora"):
        lk.dequantize(model)  # merge into a 16/32-bit copy of the base, never back into 4 bits
    merged = lk.unload(model, merge=True).to(dtypes[dtype])
    with staged_directory(target) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
