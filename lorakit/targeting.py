"""Which modules of a model get LoRA: names, suffixes, regexes, "all-linear", layer filters.

Matching follows PEFT so that an adapter_config.json means the same thing in both libraries:
a list entry matches a module whose path equals it or ends with "." + entry; a string is a regex
that must match the whole path.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Iterator

from torch import nn

from .config import CLASSIFIER_HEAD_NAMES, LoraConfig
from .errors import TargetNotFoundError
from .layers import LoraLayer, ModulesToSave, is_linear_like

DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the plain model has them: a LoRA wrapper stands in for its base layer and
    its internals (lora_A, base_layer, copies) are not listed."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from iter_base_modules(child, prefix=f"{path}.")


def unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (a dotted module path) inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def is_supported(module: nn.Module) -> bool:
    base = unwrap(module)
    return is_linear_like(base) or isinstance(base, nn.Embedding)


def name_matches(path: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith(f".{entry}") for entry in spec)


def layer_index(path: str, patterns) -> int | None:
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", path)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> list[str]:
    """The LM head (output embeddings) and classification heads, which "all-linear" leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [name for name, module in iter_base_modules(model) if head is not None and unwrap(module) is head]
    return names + [name for name, _ in model.named_children() if name in CLASSIFIER_HEAD_NAMES]


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts, in model order; raises if nothing usable matches."""
    spec = config.target_modules
    modules = list(iter_base_modules(model))
    save_spec = list(config.modules_to_save or [])
    heads = output_head_names(model)
    matched: list[str] = []
    for path, module in modules:
        if save_spec and name_matches(path, save_spec):
            continue
        if spec == "all-linear":
            if not is_linear_like(unwrap(module)) or any(path == h or path.startswith(f"{h}.") for h in heads):
                continue
        elif not name_matches(path, spec):
            continue
        if config.exclude_modules and name_matches(path, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and not isinstance(spec, str):
            wanted = config.layers_to_transform
            wanted = {wanted} if isinstance(wanted, int) else set(wanted)
            if layer_index(path, config.layers_pattern or DEFAULT_LAYER_PATTERNS) not in wanted:
                continue
        if not is_supported(module):
            if isinstance(spec, str):  # a regex or "all-linear" may sweep past norms and containers
                continue
            raise TargetNotFoundError(
                f"target_modules matched {path!r}, a {type(unwrap(module)).__name__}; lorakit adapts "
                "nn.Linear, transformers' Conv1D and nn.Embedding. Name the linear layers inside it, "
                f"e.g. {_leaf_candidates(modules, path)[:4]}."
            )
        matched.append(path)

    if not matched:
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
    found = [path for path, _ in modules if name_matches(path, list(names))]
    missing = [n for n in names if not any(name_matches(p, [n]) for p in found)]
    if missing and strict:
        all_names = sorted({p.rsplit(".", 1)[-1] for p, _ in modules})
        close = difflib.get_close_matches(missing[0], all_names, n=5)
        raise TargetNotFoundError(
            f"modules_to_save entry {missing[0]!r} matches no module in the model; "
            f"close names: {close or all_names[:10]}."
        )
    # A matched container also matches its children by suffix; keep the outermost.
    return [p for p in found if not any(p.startswith(f"{q}.") for q in found)]


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
