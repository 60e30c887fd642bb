"""Preference and RL objectives for the trainer: --task dpo | orpo | kto | grpo.

Each is an ``Objective`` (base.py): how rows are encoded, the loss of a micro-batch, evaluation.
The trainer (training/loop.py) runs them with everything else it does for SFT: batching,
accumulation, DDP, QLoRA / DoRA / checkpointing, --resume, logs and the loss curve.
"""

from __future__ import annotations

from ...io.runs import OBJECTIVE_TASKS  # noqa: F401  (one home: the run record reads them too)


def objective_for(options, tokenizer, seq_len: int):
    """The objective of ``options.task``, or None for the supervised tasks (classify, sft, lm)."""
    if options.task in ("dpo", "orpo"):
        from .pairwise import Pairwise

        return Pairwise(options, tokenizer, seq_len)
    if options.task == "kto":
        from .kto import Kto

        return Kto(options, tokenizer, seq_len)
    if options.task == "grpo":
        from .grpo import Grpo

        return Grpo(options, tokenizer, seq_len)
    return None
