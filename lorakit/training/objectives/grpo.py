"""GRPO: sample G completions per prompt, score them, and push the policy towards the better ones.

Rollouts run through the serving engine (serving/engine.py, continuous batching) on the live
adapter in this process: every prompt's G completions and every prompt of the step's micro-batches
decode together, with TRL's sampling (temperature, top_p) and a seed per completion, so a run is
reproducible. Nothing is copied or synced: the engine reads the same weights the optimizer updates.

One generation serves --num-iterations optimizer steps (TRL's num_iterations): the log-probabilities
at generation time are the "old" policy of the clipped ratio; with one iteration the ratio is 1 and
only its gradient counts (TRL). The KL term (--beta > 0) compares with the reference policy (the
adapter off, or the starting adapter's frozen copy); --beta 0 runs no reference pass at all.
Log-probabilities are taken at the sampling temperature, as TRL does.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from ...model.adapters import active_adapters
from ...model.state import BASE
from ...serving.engine import Engine
from ...serving.requests import Limits, Request
from .base import Objective
from .data import encode_prompts, is_conversation
from .losses import group_advantages, grpo_loss
from .rewards import load_rewards, score


class Grpo(Objective):
    task = "grpo"

    def __init__(self, options, tokenizer, seq_len):
        super().__init__(options, tokenizer, seq_len)
        self.group = options.num_generations
        self.rewards = load_rewards(options)
        self.engine: Engine | None = None
        self.rollouts: list[dict] = []     # the current generation's micro-batches
        self.generation = None             # which generation they belong to
        self.tokens_per_process = 1.0      # dapo's normaliser: completion tokens of the step / processes

    def encode(self, rows, split):
        return encode_prompts(rows, self.tokenizer, self.seq_len, split, room=1)

    def data_micro(self, step: int, k: int) -> int:
        """The micro-batch of prompts for accumulation step k of optimizer step ``step``: one
        generation is reused for --num-iterations steps."""
        return (step // self.options.num_iterations) * self.options.grad_accum + k

    def prepare(self, trainer) -> None:
        rows = [e["row"] for e in trainer.encoded["train"][:2]]
        self._score(rows, [{"text": "", "token_ids": []} for _ in rows])  # a reward that cannot run fails here,
        # before any step or file
        room = self.seq_len - max(len(e["prompt_ids"]) for e in trainer.encoded["train"])
        limits = Limits(max_prompt_tokens=self.seq_len, max_new_tokens=max(1, min(self.options.max_completion_length, room)),
                        max_batch=min(64, self.options.batch_size * self.group * self.options.grad_accum),
                        max_queue=1 << 30)
        self.engine = Engine(trainer.model, self.tokenizer, limits=limits)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _score(self, rows: list[dict], outputs: list[dict]) -> torch.Tensor:
        """Every reward's value (rewards × completions; NaN for None) of the engine's ``outputs`` for
        ``rows``, called as TRL calls reward functions: conversational prompts get their completion
        as an assistant message, and every other column of the rows comes as a keyword argument."""
        prompts = [r["prompt"] for r in rows]
        completions = [[{"role": "assistant", "content": out["text"]}] if is_conversation(p) else out["text"]
                       for out, p in zip(outputs, prompts)]
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]
        return torch.tensor(score(self.rewards, prompts, completions, [out["token_ids"] for out in outputs],
                                  {k: [r.get(k) for r in rows] for k in keys}))

    def _total(self, table: torch.Tensor) -> torch.Tensor:
        """The weighted sum per completion; NaN where every reward said None (TRL leaves it out)."""
        weights = torch.tensor([r.weight for r in self.rewards]).unsqueeze(1)
        return (table * weights).nansum(0).masked_fill(torch.isnan(table).all(0), math.nan)

    # --- rollouts ------------------------------------------------------------------------------
    def sample(self, model, prompts: list[list[int]], seeds: list[int | None], temperature: float, top_p: float,
               max_new_tokens: int, ignore_eos: bool = False) -> list[dict]:
        """One completion per prompt through the engine: {"text", "token_ids"} each, in order."""
        adapter = active_adapters(model)[0] if self.engine.has_adapters() else BASE  # a bare model: its base
        results: list[dict | None] = [None] * len(prompts)
        done = threading.Semaphore(0)

        def sink_for(index):
            def sink(kind, value):
                if kind in ("done", "error"):  # a result, or the ServingError raised below
                    results[index] = value
                    done.release()
            return sink

        requests = [Request("generate", adapter, ids, sink_for(i), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                            stream=False)
                    for i, (ids, seed) in enumerate(zip(prompts, seeds))]
        was_training = model.training
        model.eval()  # no LoRA dropout while sampling
        try:
            self.engine.submit_all(requests)
            for _ in requests:
                done.acquire()
        finally:
            model.train(was_training)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _generate(self, trainer, micro_batches: list[list[dict]]) -> None:
        o, group = self.options, self.group
        flat = [e for batch in micro_batches for e in batch for _ in range(group)]
        base_seed = (o.seed * 1_000_003 + self.generation * 7919 + trainer.dist.rank * 104_729) % (2 ** 62)
        budget = [min(o.max_completion_length, self.seq_len - len(e["prompt_ids"])) for e in flat]
        started = time.perf_counter()
        outputs = self.sample(trainer.model, [e["prompt_ids"] for e in flat], [base_seed + i for i in range(len(flat))],
                              o.temperature, o.top_p, max(budget))
        seconds = time.perf_counter() - started
        completions_ids = [out["token_ids"][:limit] for out, limit in zip(outputs, budget)]
        table = self._score([e["row"] for e in flat], [{**out, "token_ids": ids} for out, ids in zip(outputs, completions_ids)])
        per_completion = self._total(table)
        advantages = group_advantages(per_completion, group, o.scale_rewards)
        generated = sum(len(ids) for ids in completions_ids)
        self.rollouts, start = [], 0
        for batch in micro_batches:
            n = len(batch) * group
            part = slice(start, start + n)
            start += n
            item = self.item_for(trainer, [e["prompt_ids"] for e in batch], completions_ids[part], advantages[part])
            if o.num_iterations > 1:  # the policy that sampled: the clipped ratio's denominator
                item["old"] = self._logps(trainer, item, reference=False)
            if o.beta != 0.0:
                item["ref"] = self._logps(trainer, item, reference=True)
            self.rollouts.append(item)
        # dapo divides by the step's completion tokens over all processes, per process (DDP averages)
        self.tokens_per_process = trainer.dist.sum(float(generated)) / trainer.dist.world_size
        group_std = torch.tensor([float(torch.std(g[~torch.isnan(g)])) if (~torch.isnan(g)).sum() > 1 else 0.0
                                  for g in per_completion.view(-1, group)])
        self.generation_logs = {
            "reward": float(torch.nanmean(per_completion)), "reward_std": float(group_std.mean()),
            **{f"rewards/{r.name}": float(torch.nanmean(table[i])) for i, r in enumerate(self.rewards)},
            "completions/mean_length": generated / max(1, len(flat)),
            "completions/clipped_ratio": sum(len(c) >= b for c, b in zip(completions_ids, budget)) / max(1, len(flat)),
            "rollout_tokens_per_s": generated / max(1e-9, seconds)}

    def item_for(self, trainer, prompts: list[list[int]], completions: list[list[int]], advantages) -> dict:
        """One micro-batch of rollouts, ready for the loss: each prompt once with its G completions
        after it (data.shared_prefix_batch), and where each scored token goes in the (completion,
        token) matrix the loss works on; completions in prompt-major order (g * G + k)."""
        group, count = self.group, len(prompts)
        batch = self.shared(trainer, [(p, completions[g * group:(g + 1) * group]) for g, p in enumerate(prompts)])
        segment = batch["segment"]
        flat = (segment % count) * group + segment // count  # segment k * prompts + g -> completion g * G + k
        lengths = torch.tensor([len(c) for c in completions], device=segment.device)
        width = max(1, int(lengths.max()))
        mask = (torch.arange(width, device=segment.device) < lengths.unsqueeze(1)).float()
        return {"batch": batch, "index": (flat, batch["offset"]), "shape": (len(completions), width), "mask": mask,
                "advantages": advantages.to(segment.device), "old": None, "ref": None}

    @staticmethod
    def _matrix(values: torch.Tensor, item: dict) -> torch.Tensor:
        return torch.zeros(item["shape"], dtype=values.dtype, device=values.device).index_put(item["index"], values)

    def _logps(self, trainer, item, reference: bool) -> torch.Tensor:
        """(completions, tokens) log-probabilities at the sampling temperature, without gradient."""
        if reference:
            values = self.reference_logps(trainer, item["batch"], self.options.temperature)
        else:
            values = self.logps(trainer, item["batch"], False, temperature=self.options.temperature)
        return self._matrix(values, item)

    # --- the loss ------------------------------------------------------------------------------
    def micro_loss(self, trainer, examples, micro):
        o = self.options
        k = micro % o.grad_accum
        step_generation = trainer.step // o.num_iterations
        if self.generation != step_generation:
            self.generation = step_generation
            self._generate(trainer, [trainer.micro_batch(self.data_micro(trainer.step, j)) for j in range(o.grad_accum)])
        return self.loss_on(trainer, self.rollouts[k])

    def loss_on(self, trainer, item: dict) -> tuple[torch.Tensor, int, dict]:
        """The loss of one micro-batch of rollouts (item_for), with its "old" / "ref" log-probabilities."""
        o = self.options
        logps = self._matrix(self.logps(trainer, item["batch"], True, temperature=o.temperature), item)
        old = item["old"] if item["old"] is not None else logps.detach()
        loss, kl = grpo_loss(logps, old, item["ref"], item["advantages"], item["mask"], beta=o.beta, epsilon=o.epsilon,
                             epsilon_high=o.epsilon_high, loss_type=o.loss_type,
                             max_completion_length=o.max_completion_length, tokens_in_batch=self.tokens_per_process)
        if o.loss_type != "dapo":  # dapo's normaliser already spans the accumulated step
            loss = loss / o.grad_accum
        logs = {**getattr(self, "generation_logs", {}), "kl": float(kl)}
        return loss, int(item["batch"]["tokens"]), logs

    def evaluate(self, trainer, examples):
        """Mean reward of one greedy completion per held-out prompt (and each reward's mean)."""
        o = self.options
        values, lengths = [], []
        for start in range(0, len(examples), 64):
            chunk = examples[start:start + 64]
            budget = max(1, min(o.max_completion_length, self.seq_len - max(len(e["prompt_ids"]) for e in chunk)))
            outputs = self.sample(trainer.model, [e["prompt_ids"] for e in chunk], [None] * len(chunk), 0.0, 1.0, budget)
            values.append(self._score([e["row"] for e in chunk], outputs))
            lengths += [len(out["token_ids"]) for out in outputs]
        table = torch.cat(values, dim=1)
        total = float(torch.nanmean(self._total(table)))
        metrics = {"reward": total, "loss": -total, "completion_length": sum(lengths) / max(1, len(lengths)),
                   "examples": len(examples)}
        metrics.update({f"rewards/{r.name}": float(torch.nanmean(table[i])) for i, r in enumerate(self.rewards)})
        return metrics

    def score(self, metrics: dict) -> float:
        return metrics["reward"]
