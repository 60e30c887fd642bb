"""Which modules of a model get LoRA: names, suffixes, regexes, "all-linear", layer filters.

Matching follows PEFT so that an adapter_config.json means the same thing in both libraries:
a list entry matches a module whose path equals it or ends with "." + entry; a string is a regex
that must match the whole path.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..config import CLASSIFIER_HEAD_NAMES, SEQ_CLS_HEAD_NAMES, LoraConfig
from ..errors import ConfigError, TargetNotFoundError
from ..layers.base import LoraLayer, is_linear_like
from ..layers.modules_to_save import ModulesToSave
from ..layers.trainable_tokens import TrainableTokens

WRAPPERS = (LoraLayer, ModulesToSave, TrainableTokens)  # what stands in for a module of the plain model


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the plain model has them: a LoRA wrapper stands in for its base layer and
    its internals (lora_A, base_layer, copies) are not listed."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, WRAPPERS):
            yield from iter_base_modules(child, prefix=f"{path}.")


def unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, (ModulesToSave, TrainableTokens)):
        return module.original_module
    return module


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder layers and the like): modules of a class transformers
    marks as not to be split (``_no_split_modules``); empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


_structure = [0]  # bumped by every replace_module: lorakit's wrappers come and go only through it


def structure_generation() -> int:
    """A number that changes whenever replace_module puts a module into any model: what
    model/state.py's cached list of wrappers is keyed on."""
    return _structure[0]


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (a dotted module path) inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    _structure[0] += 1


def is_supported(module: nn.Module) -> bool:
    base = unwrap(module)
    return is_linear_like(base) or isinstance(base, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def name_matches(path: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith(f".{entry}") for entry in spec)


def inside_modules_to_save(path: str, names: list[str] | None) -> bool:
    """PEFT's guard: a module whose path contains a modules_to_save name as a dotted component (the
    saved module itself or anything inside it) never gets LoRA; the entry is used as a regex."""
    return bool(names) and any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in names)


def layer_index(path: str, patterns) -> int | None:
    """PEFT's rule: the number after ``<pattern>.`` (without a pattern: the first numbered segment)."""
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return int(found.group(1)) if found else None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        found = re.match(rf".*?\.{pattern}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((path for path, module in iter_base_modules(model) if module is target or unwrap(module) is target),
                None)


def output_head_names(model: nn.Module) -> list[str]:
    """The LM head (output embeddings) and top-level classification heads, which quantization skips."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [name for name in [_path_of(model, head) if head is not None else None] if name]
    return names + [name for name, _ in model.named_children() if name in CLASSIFIER_HEAD_NAMES]


def all_linear_exclusions(model: nn.Module, task_type: str | None) -> set[str]:
    """What "all-linear" leaves out, as PEFT decides it: for a transformers model, the output
    embeddings (the LM head); for one without them and task_type SEQ_CLS, the module named
    ``score`` or ``classifier`` (that module only: the linear layers inside a head module such as
    RoBERTa's are left to the modules_to_save guard)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return set()
    head = model.get_output_embeddings()
    if head is not None:
        return {p for p in [_path_of(model, head)] if p}
    if task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            module = getattr(model, name, None)
            if module is not None:
                return {p for p in [_path_of(model, module)] if p}
    return set()


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts, in model order; raises if nothing usable matches."""
    spec = config.target_modules
    modules = list(iter_base_modules(model))
    excluded = all_linear_exclusions(model, config.task_type) if spec == "all-linear" else set()
    matched: list[str] = []
    for path, module in modules:
        if config.exclude_modules and name_matches(path, config.exclude_modules):
            continue
        if inside_modules_to_save(path, config.modules_to_save):
            continue
        if spec == "all-linear":
            if not is_linear_like(unwrap(module)) or path in excluded:
                continue
        elif spec is None or not name_matches(path, spec):
            continue
        if config.layers_to_transform is not None and config.layers_to_transform != [] and not isinstance(spec, str):
            wanted = config.layers_to_transform
            wanted = {wanted} if isinstance(wanted, int) else set(wanted)
            if layer_index(path, config.layers_pattern) not in wanted:
                continue
        if not is_supported(module):
            if isinstance(spec, str):  # a regex may sweep past norms and containers
                continue
            raise TargetNotFoundError(
                f"target_modules matched {path!r}, a {type(unwrap(module)).__name__}; lorakit adapts "
                "nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Name the layers inside it, "
                f"e.g. {_leaf_candidates(modules, path)[:4]}."
            )
        matched.append(path)

    if not matched and not config.target_parameters:
        raise TargetNotFoundError(_no_match_message(spec, modules))
    if isinstance(spec, (list, tuple)):
        unused = [e for e in spec if not any(name_matches(p, [e]) for p, _ in modules)]
        if unused:
            warnings.warn(f"target_modules entries matched no module: {unused}", stacklevel=3)
    return matched


def find_modules_to_save(model: nn.Module, names: list[str] | None, strict: bool = True) -> list[str]:
    """Paths of the modules trained in full; strict=False tolerates names that match nothing
    (PEFT writes both "classifier" and "score" for every classification adapter)."""
    if not names:
        return []
    modules = list(iter_base_modules(model))
    # PEFT wraps a module whose path ends with an entry (a plain string suffix, no dot boundary)
    found = [path for path, _ in modules if any(path.endswith(n) for n in names)]
    missing = [n for n in names if not any(p.endswith(n) for p in found)]
    if missing and strict:
        all_names = sorted({p.rsplit(".", 1)[-1] for p, _ in modules})
        close = difflib.get_close_matches(missing[0], all_names, n=5)
        raise TargetNotFoundError(
            f"modules_to_save entry {missing[0]!r} matches no module in the model; "
            f"close names: {close or all_names[:10]}."
        )
    # A matched container also matches its children by suffix; keep the outermost.
    return [p for p in found if not any(p.startswith(f"{q}.") for q in found)]


@dataclass(frozen=True)
class TokenTarget:
    """A table whose rows ``indices`` train (trainable_token_indices); ``tied_to``: the embedding
    whose weight this output head shares (it then holds no rows of its own)."""

    path: str
    indices: tuple[int, ...]
    tied_to: str | None = None


def find_token_targets(model: nn.Module, config: LoraConfig) -> list[TokenTarget]:
    """Where ``config.trainable_token_indices`` trains rows, as PEFT resolves it: a list means the
    input embedding; a dict maps module names (matched as path suffixes) to ids. An output head tied
    to a targeted input embedding follows it. Raises on names that match nothing, tables of another
    kind and ids outside the vocabulary."""
    spec = config.trainable_token_indices
    if spec is None:
        return []
    modules = list(iter_base_modules(model))
    embedding = _input_embedding(model)
    embedding_path = _path_of(model, embedding) if embedding is not None else None
    if isinstance(spec, dict):
        wanted = list(spec.items())
    else:
        path = embedding_path or next((p for p, _ in modules if p.endswith("embed_tokens")), None)
        if path is None:
            raise TargetNotFoundError("trainable_token_indices is a list, meaning the input embedding, and this model "
                                      "has none that lorakit can find; give {module name: ids} instead.")
        wanted = [(path, spec)]
    targets: dict[str, tuple[int, ...]] = {}
    for name, ids in wanted:
        found = [p for p, _ in modules if p.endswith(name)]
        if not found:
            close = difflib.get_close_matches(name, sorted({p.rsplit(".", 1)[-1] for p, _ in modules}), n=5)
            raise TargetNotFoundError(f"trainable_token_indices names {name!r}, which matches no module of the model; "
                                      f"close names: {close}.")
        for path in found:
            _check_token_table(unwrap(model.get_submodule(path)), path, ids)
            targets[path] = tuple(ids)
    result = [TokenTarget(path, ids) for path, ids in targets.items()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and embedding_path in targets and unwrap(head).weight is unwrap(embedding).weight:
        head_path = _path_of(model, head)
        if head_path in targets and targets[head_path] != targets[embedding_path]:
            raise ConfigError(f"{head_path!r} shares its weight with {embedding_path!r} (tied embeddings), so both "
                              "must train the same token ids; give them the same list, or only the embedding.")
        result = [t for t in result if t.path != head_path] + [TokenTarget(head_path, targets[embedding_path],
                                                                           tied_to=embedding_path)]
    return result


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def _check_token_table(module: nn.Module, path: str, ids) -> None:
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ConfigError(f"{path!r} renormalises its rows (max_norm); trainable tokens need a plain embedding.")
        size = module.num_embeddings
    elif isinstance(module, nn.Linear) and module.bias is None:
        size = module.out_features
    else:
        raise ConfigError(f"trainable_token_indices targets {path!r}, a {type(module).__name__}; it trains rows of an "
                          "nn.Embedding (or of a bias-free output head).")
    outside = [i for i in ids if i >= size]
    if outside:
        raise ConfigError(f"trainable_token_indices has token ids {outside[:5]} outside {path!r}'s vocabulary of {size} "
                          "rows; resize the embedding first (model.resize_token_embeddings(len(tokenizer)), what "
                          "`lorakit train --add-tokens` does) or fix the ids.")


def minimal_suffixes(model: nn.Module, chosen: list[str]) -> list[str]:
    """The shortest dotted suffixes that match exactly ``chosen`` (for writing "all-linear" out)."""
    chosen_set = set(chosen)
    others = [p for p, _ in iter_base_modules(model) if p not in chosen_set]
    result = set()
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(name_matches(o, [suffix]) for o in others):
                result.add(suffix)
                break
    return sorted(result)


def _leaf_candidates(modules, under: str) -> list[str]:
    return [p.rsplit(".", 1)[-1] for p, m in modules if p.startswith(f"{under}.") and is_supported(m)]


def _no_match_message(spec, modules) -> str:
    supported = sorted({p.rsplit(".", 1)[-1] for p, m in modules if is_supported(m)})
    suffixes = sorted({".".join(p.split(".")[-k:]) for p, m in modules if is_supported(m) for k in (1, 2, 3)})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, suffixes, n=3, cutoff=0.5)})
    hint = f" Close candidates: {close}." if close else ""
    return (
        f"target_modules {spec!r} matched no module of the model.{hint} "
        f"Adaptable layer names in this model: {supported[:20]}"
        + (" ..." if len(supported) > 20 else "")
        + "; or use target_modules='all-linear'."
    )
