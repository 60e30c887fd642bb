"""GRPO's reward functions: built-ins and the user's own, called as TRL calls them.

A reward function takes keyword arguments ``prompts``, ``completions``, ``completion_ids`` and every
other column of the data set (one list entry per completion) and returns one number per completion,
or None for a completion it cannot score (TRL's convention: it is left out of the group's
statistics). ``--reward`` names one per use, ``NAME`` or ``NAME=WEIGHT``; NAME is a built-in or
``module:function`` (a module on the Python path, or a ``path/to/file.py``).

Built-ins:
  answer_match   1 when the answer extracted from the completion (--answer-pattern, first group,
                 else the whole match; default: the first word) equals the row's --answer-column
                 (default "answer", or "label"), ignoring case and surrounding punctuation; else 0
  format         1 when the stripped completion matches --format-pattern in full; else 0
  length         −(completion tokens / --max-completion-length): a penalty for long answers
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import ConfigError

FIRST_WORD = r"([^\W_]+)"


def completion_text(completion) -> str:
    """A completion as text: conversational completions are [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def _normalise(value) -> str:
    return str(value).strip().strip(".,;:!?\"'").lower()


def answer_match(pattern: str, column: str | None) -> Callable:
    regex = re.compile(pattern)

    def reward(prompts, completions, **columns):
        nonlocal column
        column = column or ("answer" if "answer" in columns else "label")
        if column not in columns:
            raise ConfigError(f"reward answer_match compares with column {column!r}, which the data does not have; "
                              f"columns: {', '.join(sorted(k for k in columns if k != 'completion_ids'))}; "
                              "set --answer-column")
        scores = []
        for completion, expected in zip(completions, columns[column]):
            found = regex.search(completion_text(completion))
            answer = (found.group(1) if found and found.groups() else found.group(0)) if found else None
            scores.append(float(answer is not None and _normalise(answer) == _normalise(expected)))
        return scores
    return reward


def format_match(pattern: str) -> Callable:
    regex = re.compile(pattern)

    def reward(prompts, completions, **columns):
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]
    return reward


def length_penalty(max_length: int) -> Callable:
    def reward(prompts, completions, completion_ids, **columns):
        return [-len(ids) / max_length for ids in completion_ids]
    return reward


@dataclass(frozen=True)
class Reward:
    name: str
    function: Callable
    weight: float


def _import(spec: str) -> Callable:
    module_name, _, attribute = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"--reward {spec}: no file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--reward {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec}: {module_name!r} has no function {attribute!r}")
    return function


def _regex(pattern: str | None, flag: str) -> None:
    try:
        re.compile(pattern or "")
    except re.error as exc:
        raise ConfigError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None


def load_rewards(options) -> list[Reward]:
    """The run's rewards from --reward (default: answer_match), with their weights."""
    rewards = []
    for spec in options.rewards or ["answer_match"]:
        name, _, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
        try:
            weight = float(weight)
        except ValueError:
            raise ConfigError(f"--reward {spec}: the weight after '=' must be a number") from None
        if not math.isfinite(weight):
            raise ConfigError(f"--reward {spec}: the weight must be finite")
        if name == "answer_match":
            _regex(options.answer_pattern, "--answer-pattern")
            function = answer_match(options.answer_pattern or FIRST_WORD, options.answer_column)
        elif name == "format":
            _regex(options.format_pattern, "--format-pattern")
            if not options.format_pattern:
                raise ConfigError("--reward format needs --format-pattern REGEX (the whole completion must match it)")
            function = format_match(options.format_pattern)
        elif name == "length":
            function = length_penalty(options.max_completion_length)
        elif ":" in name:
            function = _import(name)
        else:
            raise ConfigError(f"unknown --reward {name!r}; use answer_match, format, length or module:function")
        rewards.append(Reward(name, function, weight))
    return rewards


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list]) -> list[list[float]]:
    """Each reward's values for every completion (NaN for None), checked: one number per completion."""
    table = []
    for reward in rewards:
        try:
            values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"reward {reward.name} failed: {type(exc).__name__}: {exc}") from exc
        values = list(values) if values is not None else None
        if values is None or len(values) != len(completions):
            raise ConfigError(f"reward {reward.name} returned {'nothing' if values is None else len(values)} values "
                              f"for {len(completions)} completions; return one number (or None) per completion")
        row = []
        for i, value in enumerate(values):
            if value is None:
                row.append(math.nan)
                continue
            scalar = getattr(value, "ndim", None) == 0 and hasattr(value, "item")  # a 0-d tensor or numpy value
            if not (isinstance(value, numbers.Real) or scalar):
                raise ConfigError(f"reward {reward.name} returned {value!r} ({type(value).__name__}) for completion "
                                  f"{i}; return a number, or None for a completion it cannot score")
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"reward {reward.name} returned {value} for completion {i}; return a finite number, "
                                  "or None for a completion it cannot score")
            row.append(value)
        table.append(row)
    return table
