"""Preference and RL data, in the layouts TRL defines, tokenized as TRL tokenizes them.

Layouts (columns of a row):
  paired     prompt / chosen / rejected       (DPO, ORPO, SimPO)
  implicit   chosen / rejected                (the prompt is their longest common prefix)
  unpaired   prompt / completion / label      (KTO; label true = desirable)
  prompt     prompt, plus any columns the rewards read (GRPO)
Each text field is either plain text or a conversation (a list of {"role", "content"} messages),
to which the tokenizer's chat template is applied. Plain-text completions get the EOS token
appended, as TRL does, so the model learns to stop.

The embedded rotten-tomatoes set becomes each layout: the review question as the prompt, the
right label chosen (desirable), the other rejected (undesirable); GRPO keeps the label column.
"""

from __future__ import annotations

import warnings

import torch

from ...errors import ConfigError
from ..data import RT_PROMPT

LAYOUTS = {"paired": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
           "unpaired": ("prompt", "completion", "label"), "prompt": ("prompt",)}
TASK_LAYOUTS = {"dpo": ("paired", "implicit"), "orpo": ("paired", "implicit"), "kto": ("unpaired",),
                "grpo": ("prompt",)}
SENTIMENTS = ("negative", "positive")


def layout_of(task: str, columns, split: str) -> str:
    """The layout of ``columns`` that ``task`` accepts, or a ConfigError naming what was found."""
    for layout in TASK_LAYOUTS[task]:
        if all(c in columns for c in LAYOUTS[layout]):
            return layout
    accepted = "; ".join(f"{name}: {' / '.join(LAYOUTS[name])}" for name in TASK_LAYOUTS[task])
    raise ConfigError(f"--task {task}: the {split} split has columns {', '.join(map(repr, columns)) or '(none)'}, "
                      f"which match no layout it accepts ({accepted}); rename the columns or pick another --task")


def embedded_rows(task: str, rows: list[dict]) -> list[dict]:
    """rotten-tomatoes rows (text, label) in ``task``'s layout, as chat conversations."""
    out = []
    for i, row in enumerate(rows):
        prompt = [{"role": "user", "content": RT_PROMPT.format(text=row["text"])}]
        right, wrong = row["label"], SENTIMENTS[1 - SENTIMENTS.index(row["label"])]
        answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        if task == "kto":  # alternate desirable / undesirable so both kinds are in every batch
            good = i % 2 == 0
            out.append({"prompt": prompt, "completion": answer(right if good else wrong), "label": good})
        elif task == "grpo":
            out.append({"prompt": prompt, "label": right})
        else:
            out.append({"prompt": prompt, "chosen": answer(right), "rejected": answer(wrong)})
    return out


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def extract_prompt(row: dict) -> dict:
    """An implicit-prompt pair split into prompt / chosen / rejected at their common prefix (TRL's
    extract_prompt: by messages for conversations, by characters for text, never cutting after a
    space)."""
    chosen, rejected = row["chosen"], row["rejected"]
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return {**row, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _ids(tokenizer, value, generation_prompt: bool = False) -> list[int]:
    if isinstance(value, list):
        if not tokenizer.chat_template:
            raise ConfigError("the data holds conversations but the tokenizer has no chat template; give plain text")
        return list(tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_and_completions(tokenizer, prompt, completions: list) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each completion after it, as TRL splits them: the completion
    starts where the tokenized prompt and prompt + completion diverge."""
    conversational = is_conversation(prompt)
    for completion in completions:
        if is_conversation(completion) != conversational:
            raise ConfigError("a row mixes a conversation and plain text between its prompt and completions; use one")
    if conversational:
        prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
        full = [_ids(tokenizer, prompt + completion) for completion in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _ids(tokenizer, str(prompt))
        full = [_ids(tokenizer, str(prompt) + (str(c) if str(c).endswith(eos) else str(c) + eos)) for c in completions]
    cut = min([len(prompt_ids), *(_common_prefix(prompt_ids, ids) for ids in full)])
    return prompt_ids[:cut], [ids[cut:] for ids in full]


class Dropped:
    """Counts rows whose prompt alone fills --seq-len (no completion token would remain) and warns once."""

    def __init__(self, seq_len: int):
        self.seq_len, self.count = seq_len, 0

    def report(self, split: str) -> None:
        if self.count:
            warnings.warn(f"{self.count} {split} row(s) dropped: the prompt alone fills --seq-len {self.seq_len}, "
                          "leaving no completion token to learn from; raise --seq-len to keep them", stacklevel=3)


def encode_pairs(rows: list[dict], tokenizer, seq_len: int, split: str) -> list[dict]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair; pairs are cut to --seq-len from the
    end (TRL's keep_start) and dropped when the prompt alone fills it."""
    if not rows:
        return []
    layout = layout_of("dpo", rows[0], split)
    dropped, out = Dropped(seq_len), []
    for row in rows:
        row = extract_prompt(row) if layout == "implicit" else row
        prompt, (chosen, rejected) = prompt_and_completions(tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
        if len(prompt) >= seq_len:
            dropped.count += 1
            continue
        room = seq_len - len(prompt)
        out.append({"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]})
    dropped.report(split)
    return out


def encode_unpaired(rows: list[dict], tokenizer, seq_len: int, split: str) -> list[dict]:
    """{"prompt_ids", "completion_ids", "label"} per row, and "kl_ids": the completion of the row
    before it (cyclically), KTO's mismatched pair for the KL baseline."""
    if not rows:
        return []
    layout_of("kto", rows[0], split)
    dropped, out = Dropped(seq_len), []
    for row in rows:
        label = row["label"]
        if isinstance(label, str):
            if label.strip().lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--task kto: label {label!r} in the {split} split; use true / false (desirable or not)")
            label = label.strip().lower() in ("true", "1")
        prompt, (completion,) = prompt_and_completions(tokenizer, row["prompt"], [row["completion"]])
        if len(prompt) >= seq_len:
            dropped.count += 1
            continue
        out.append({"prompt_ids": prompt, "completion_ids": completion[:seq_len - len(prompt)], "label": bool(label)})
    dropped.report(split)
    for i, example in enumerate(out):
        example["kl_ids"] = out[i - 1]["completion_ids"][:seq_len - len(example["prompt_ids"])]
    return out


def encode_prompts(rows: list[dict], tokenizer, seq_len: int, split: str, room: int) -> list[dict]:
    """{"prompt_ids", "row"} per GRPO prompt (the row's other columns go to the rewards). A prompt
    that leaves fewer than ``room`` tokens of --seq-len to generate in is refused."""
    if not rows:
        return []
    layout_of("grpo", rows[0], split)
    out, long = [], 0
    for row in rows:
        prompt = row["prompt"]
        ids = _ids(tokenizer, prompt, generation_prompt=True) if is_conversation(prompt) else _ids(tokenizer, str(prompt))
        long += len(ids) + room > seq_len
        out.append({"prompt_ids": ids, "row": row})
    if long:
        raise ConfigError(f"--task grpo: {long} {split} prompt(s) leave no room to generate within --seq-len {seq_len} "
                          f"(the longest prompt has {max(len(e['prompt_ids']) for e in out)} tokens; a completion gets "
                          "what --seq-len leaves, at most --max-completion-length); raise --seq-len or shorten the prompts")
    return out


def shared_prefix_batch(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, score_prompt: bool = False,
                        additive_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One row per group (a prompt and the completions that follow it): the prompt once, then each
    completion, and a 4-D mask under which every completion sees the prompt and itself only, with
    positions continuing from the prompt. Scoring a pair (or G rollouts) this way computes the
    shared prompt once instead of once per completion; each completion's log-probabilities are
    what it would get alone.

    What comes back besides input_ids / position_ids / attention_mask: for every completion token,
    the flat position that predicts it (``positions``), the token (``targets``), its completion
    (``segment``: completion k of group g is segment k * groups + g, so a pair batch lists every
    chosen, then every rejected, as TRL does) and its index in the completion (``offset``); the
    completions' ``lengths``; with ``score_prompt`` the same for the prompt tokens of each group's
    first completion (``prompt_positions`` / ``prompt_targets`` / ``prompt_segment``, ORPO's NLL).
    ``additive_dtype``: a float mask (0 / min) for attention implementations that add it to the
    scores, instead of a boolean one."""
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in groups)
    n, per_group = len(groups), len(groups[0][1])
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(n, 1)
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(n, 1, 1)  # padding: causal, harmless
    scored = {key: [] for key in ("positions", "targets", "segment", "offset", "prompt_positions", "prompt_targets",
                                  "prompt_segment")}
    lengths = torch.zeros(n * per_group, dtype=torch.long)
    for g, (prompt, completions) in enumerate(groups):
        plen, start = len(prompt), len(prompt)
        ids[g, :plen] = torch.tensor(prompt, dtype=torch.long)
        allowed[g, :, plen:] = False
        for k, completion in enumerate(completions):
            span = slice(start, start + len(completion))
            ids[g, span] = torch.tensor(completion, dtype=torch.long)
            position_ids[g, span] = torch.arange(plen, plen + len(completion))
            block = torch.tril(torch.ones(len(completion), len(completion), dtype=torch.bool))
            allowed[g, span, :] = False
            allowed[g, span, :plen] = True
            allowed[g, span, span] = block
            segment = k * n + g
            lengths[segment] = len(completion)
            for j, token in enumerate(completion):
                scored["positions"].append(g * width + (plen - 1 if j == 0 else start + j - 1))
                scored["targets"].append(token)
                scored["segment"].append(segment)
                scored["offset"].append(j)
            start += len(completion)
        allowed[g, start:, :] = torch.tril(torch.ones(width - start, width, dtype=torch.bool), diagonal=start)
        if score_prompt:
            for j in range(1, plen):
                scored["prompt_positions"].append(g * width + j - 1)
                scored["prompt_targets"].append(prompt[j])
                scored["prompt_segment"].append(g)
    mask = allowed.unsqueeze(1)
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype).masked_fill_(~mask, torch.finfo(additive_dtype).min)
    out = {"input_ids": ids, "position_ids": position_ids, "attention_mask": mask, "lengths": lengths,
           "tokens": torch.tensor(int(sum(len(p) + sum(len(c) for c in cs) for p, cs in groups)))}
    out.update({key: torch.tensor(values, dtype=torch.long) for key, values in scored.items()})
    return out


def mask_dtype(model) -> torch.dtype | None:
    """None (a boolean mask) where attention goes through torch's SDPA, which takes one in any
    dtype; else the dtype of an additive mask the eager path adds to its scores."""
    if getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "flex_attention"):
        return None
    return model.get_input_embeddings().weight.dtype
