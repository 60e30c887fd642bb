"""Paired preferences: DPO (sigmoid, ipo, hinge, robust), reference-free SimPO, and ORPO.

One forward runs the chosen and the rejected sequences of a micro-batch together (2 × batch rows,
TRL's order). DPO's reference log-probabilities come from a no-grad forward of the same batch under
the reference policy, or once before training (--precompute-ref). ORPO and SimPO need no reference;
ORPO adds the NLL of the chosen sequences, prompt included, and SimPO with --cpo-alpha > 0 that of
the chosen completions, each as TRL does.
"""

from __future__ import annotations

import torch

from ...kernels.logprobs import shifted_targets
from ...kernels.losses import IGNORE_INDEX
from .base import Objective, shift
from .data import collate_pairs, encode_pairs
from .losses import dpo_loss, orpo_loss, simpo_loss


class Pairwise(Objective):
    def __init__(self, options, tokenizer, seq_len):
        super().__init__(options, tokenizer, seq_len)
        self.task = options.task
        self.loss_type = "orpo" if options.task == "orpo" else options.loss_type
        self.needs_reference = self.loss_type not in ("simpo", "orpo")
        self.needs_nll = self.loss_type == "orpo" or (self.loss_type == "simpo" and options.cpo_alpha > 0)

    def encode(self, rows, split):
        return encode_pairs(rows, self.tokenizer, self.seq_len, split)

    def prepare(self, trainer) -> None:
        if self.needs_reference and self.options.precompute_ref:
            for split, examples in trainer.encoded.items():
                for start in range(0, len(examples or []), self.batch_eval):
                    chunk = examples[start:start + self.batch_eval]
                    batch = trainer.dist.to_device(collate_pairs(chunk, self.pad_id))
                    sums = self.reference_logps(trainer, batch, shifted_targets(batch["input_ids"], batch["completion_mask"])).sum(1)
                    for example, chosen, rejected in zip(chunk, *sums.chunk(2)):
                        example["ref_chosen_logps"], example["ref_rejected_logps"] = float(chosen), float(rejected)

    def _forward(self, trainer, examples, grad: bool):
        n = len(examples)
        batch = trainer.dist.to_device(collate_pairs(examples, self.pad_id))
        completion = shift(batch["completion_mask"])
        scored = batch["completion_mask"]
        if self.loss_type == "orpo":  # ORPO's NLL covers the chosen rows whole, prompt included (TRL)
            scored = batch["attention_mask"].clone()
            scored[n:] = batch["completion_mask"][n:]
        targets = shifted_targets(batch["input_ids"], scored)
        runner = trainer.wrapped if grad else trainer.runner_module
        with self.autocast(trainer), torch.enable_grad() if grad else torch.no_grad():
            logps = runner(batch["input_ids"], batch["attention_mask"], targets)
        sums, counts = (logps * completion).sum(1), completion.sum(1).float()
        nll = None
        if self.needs_nll:
            full = (targets[:n] != IGNORE_INDEX).float()
            nll = -(logps[:n] * full).sum() / full.sum().clamp(min=1)
        return batch, sums, counts, nll

    def _loss(self, trainer, examples, grad: bool):
        n = len(examples)
        batch, sums, counts, nll = self._forward(trainer, examples, grad)
        o = self.options
        chosen, rejected = sums[:n], sums[n:]
        if self.loss_type == "orpo":
            loss, r_chosen, r_rejected, log_odds = orpo_loss(chosen / counts[:n], rejected / counts[n:], nll, beta=o.beta)
            extra = {"log_odds_ratio": float(log_odds), "nll_loss": float(nll)}
        elif self.loss_type == "simpo":
            loss, r_chosen, r_rejected = simpo_loss(chosen / counts[:n], rejected / counts[n:], beta=o.beta,
                                                    gamma=o.simpo_gamma, label_smoothing=o.label_smoothing)
            if nll is not None:
                loss = loss + o.cpo_alpha * nll
            extra = {}
        else:
            if "ref_chosen_logps" in examples[0]:
                ref = torch.tensor([[e["ref_chosen_logps"] for e in examples], [e["ref_rejected_logps"] for e in examples]],
                                   device=sums.device)
                ref_chosen, ref_rejected = ref[0], ref[1]
            else:
                targets = shifted_targets(batch["input_ids"], batch["completion_mask"])
                ref_sums = self.reference_logps(trainer, batch, targets).sum(1)
                ref_chosen, ref_rejected = ref_sums[:n], ref_sums[n:]
            loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type,
                                                  beta=o.beta, label_smoothing=o.label_smoothing,
                                                  chosen_tokens=counts[:n], rejected_tokens=counts[n:])
            extra = {}
        ranked = (chosen / counts[:n] > rejected / counts[n:]) if self.loss_type in ("orpo", "simpo") else chosen > rejected
        logs = {"rewards/chosen": float(r_chosen.mean()), "rewards/rejected": float(r_rejected.mean()),
                "rewards/accuracies": float((r_chosen > r_rejected).float().mean()),
                "rewards/margins": float((r_chosen - r_rejected).mean()),
                "logps/chosen": float(chosen.detach().mean()), "logps/rejected": float(rejected.detach().mean()),
                "preference_accuracy": float(ranked.float().mean()), **extra}
        return loss, int(batch["attention_mask"].sum()), logs
