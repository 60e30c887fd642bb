"""`--packing` for lm and sft: several examples per row, none attending to another.

Examples are laid end to end, in order, into rows of at most seq_len tokens. Each keeps its own
position ids (0, 1, 2, ... restarting per example) and the row is fed without an attention mask or KV cache:
transformers then reads the restarts as sequence boundaries and builds a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices), so the result per example is what it would be alone.
The first token of every example carries no label (nothing before it in its own sequence predicts it),
and an sft example keeps loss only on its answer tokens.
"""

from __future__ import annotations

import torch


def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    rows: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids = list(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > seq_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [-100] + list(example["labels"])[1:]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded packed rows; the padding is one more sequence (its own positions, no labels)."""
    longest = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), longest), pad_id, dtype=torch.long),
             "labels": torch.full((len(rows), longest), -100, dtype=torch.long),
             "position_ids": torch.arange(longest).repeat(len(rows), 1)}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["labels"][i, :n] = torch.tensor(row["labels"])
        batch["position_ids"][i, :n] = torch.tensor(row["position_ids"])
        batch["position_ids"][i, n:] = torch.arange(longest - n)
    return batch
