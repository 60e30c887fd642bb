"""How a command answers: the result as JSON under --json (for scripts), else lines for a person."""

from __future__ import annotations

import json
from typing import Callable, Iterable


def answer(args, result: dict, human: Callable[[dict], Iterable[str]]) -> int:
    """Print ``result`` as JSON when the command ran with --json, else each line ``human(result)``
    yields; the command's exit code (0)."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        for line in human(result):
            print(line)
    return 0
