"""What every preference / RL objective shares: the module a training step runs (token
log-probabilities, so DDP wraps it as it wraps the supervised loss), the reference policy, and
evaluation over a split in batches.

The reference policy is the model itself: with its adapter switched off (a new adapter: the
reference is the base), or, when the run starts from a trained adapter (--adapter), a frozen copy of
that adapter loaded beside it under the name "ref" (TRL's convention), so no second model exists.
"""

from __future__ import annotations

import contextlib

import torch

import lorakit as lk

from ...kernels.logprobs import gathered_logprobs
from .data import mask_dtype, shared_prefix_batch

REFERENCE = "ref"


class TokenLogProbLM(torch.nn.Module):
    """A causal LM whose forward returns log p(target) at chosen flat positions (lk.gathered_logprobs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, positions, targets, temperature: float = 1.0, position_ids=None):
        return gathered_logprobs(self.model, input_ids, attention_mask, positions, targets, temperature,
                                 position_ids=position_ids)


@contextlib.contextmanager
def reference_policy(model):
    """The block runs the reference policy: the frozen "ref" copy when there is one, else the base."""
    if REFERENCE in lk.list_adapters(model):
        active = lk.active_adapters(model)
        lk.set_adapter(model, REFERENCE)
        try:
            yield model
        finally:
            lk.set_adapter(model, active)
    else:
        with lk.disable_adapters(model):
            yield model


class Objective:
    """The task-specific part of a run: encoding, the loss of a micro-batch, evaluation. The
    trainer (loop.py) owns everything else: batching, the optimizer, checkpoints, logging."""

    task = ""
    batch_eval = 8

    def __init__(self, options, tokenizer, seq_len: int):
        self.options, self.tokenizer, self.seq_len = options, tokenizer, seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def runner(self, model):
        return TokenLogProbLM(model)

    def data_micro(self, step: int, k: int) -> int:
        """Which micro-batch of the data accumulation step k of optimizer step ``step`` reads."""
        return step * self.options.grad_accum + k

    def prepare(self, trainer) -> None:
        """Work before the first step (precomputed reference log-probabilities, rollout engine)."""

    def close(self) -> None:
        """Release what prepare() started."""

    def encode(self, rows: list[dict], split: str) -> list[dict]:
        raise NotImplementedError

    def _loss(self, trainer, examples: list[dict], grad: bool) -> tuple[torch.Tensor, int, dict]:
        """(mean loss of these examples, tokens, logged values)."""
        raise NotImplementedError

    def micro_loss(self, trainer, examples: list[dict], micro: int) -> tuple[torch.Tensor, int, dict]:
        """(loss to backpropagate, already divided for accumulation; tokens; logged values)."""
        loss, tokens, logs = self._loss(trainer, examples, grad=True)
        return loss / self.options.grad_accum, tokens, logs

    def evaluate(self, trainer, examples: list[dict]) -> dict:
        """The loss and logged values over ``examples``, in batches, weighted by batch size."""
        totals, weight = {}, 0
        for start in range(0, len(examples), self.batch_eval):
            chunk = examples[start:start + self.batch_eval]
            with torch.no_grad():
                loss, _, logs = self._loss(trainer, chunk, grad=False)
            for key, value in {"loss": float(loss), **logs}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            weight += len(chunk)
        return {**{k: v / max(1, weight) for k, v in totals.items()}, "examples": weight}

    def score(self, metrics: dict) -> float:
        """Higher is better: what selects the best validation checkpoint."""
        return -metrics["loss"]

    # helpers
    def autocast(self, trainer):
        return torch.autocast(trainer.dist.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def shared(self, trainer, groups, score_prompt: bool = False) -> dict:
        """shared_prefix_batch on the run's device, with the mask kind the model's attention takes."""
        return trainer.dist.to_device(shared_prefix_batch(groups, self.pad_id, score_prompt, mask_dtype(trainer.model)))

    def logps(self, trainer, batch: dict, grad: bool, positions=None, targets=None, temperature: float = 1.0):
        """Log-probabilities of the batch's scored tokens under the policy (through the step's runner
        when ``grad``, so DDP sees the forward)."""
        runner = trainer.wrapped if grad else trainer.runner_module
        positions = batch["positions"] if positions is None else positions
        targets = batch["targets"] if targets is None else targets
        with self.autocast(trainer), torch.enable_grad() if grad else torch.no_grad():
            return runner(batch["input_ids"], batch["attention_mask"], positions, targets, temperature,
                          position_ids=batch["position_ids"])

    def reference_sums(self, trainer):
        """(examples, their completions' summed reference log-probabilities) for every batch of every
        split: what --precompute-ref stores once before training (needs the objective's batch())."""
        for examples in trainer.encoded.values():
            for start in range(0, len(examples or []), self.batch_eval):
                chunk = examples[start:start + self.batch_eval]
                batch = self.batch(trainer, chunk)
                yield chunk, segment_sums(self.reference_logps(trainer, batch), batch)

    def reference_logps(self, trainer, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """The same under the reference policy, without gradient."""
        with reference_policy(trainer.model):
            return self.logps(trainer, batch, False, temperature=temperature)


def segment_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-completion sums of per-token values (in the batch's segment order)."""
    return torch.zeros(batch["lengths"].numel(), dtype=values.dtype, device=values.device).index_add(
        0, batch["segment"], values)


def mean_logs(logs: list[dict]) -> dict:
    """Per-key means of the values micro-batches logged."""
    keys = {k for entry in logs for k in entry}
    return {k: sum(e[k] for e in logs if k in e) / sum(1 for e in logs if k in e) for k in sorted(keys)}
