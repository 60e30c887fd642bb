"""Paired preferences: DPO (sigmoid, ipo, hinge, robust), reference-free SimPO, and ORPO.

A pair's chosen and rejected completions share their prompt, so one row holds the prompt once and
both completions after it (data.shared_prefix_batch: each completion attends to the prompt and
itself): the prompt, usually most of the tokens, is computed once instead of twice, for the policy
and for the reference alike. DPO's reference log-probabilities come from a no-grad forward of the
same batch under the reference policy, or once before training (--precompute-ref). ORPO and SimPO
need no reference; ORPO adds the NLL of the chosen sequences, prompt included, and SimPO with
--cpo-alpha > 0 that of the chosen completions, each as TRL does.
"""

from __future__ import annotations

import torch

from .base import Objective, segment_sums
from .data import encode_pairs
from .losses import dpo_loss, orpo_loss, simpo_loss


class Pairwise(Objective):
    def __init__(self, options, tokenizer, seq_len):
        super().__init__(options, tokenizer, seq_len)
        self.task = options.task
        self.loss_type = "orpo" if options.task == "orpo" else options.loss_type
        self.needs_reference = self.loss_type not in ("simpo", "orpo")

    def encode(self, rows, split):
        return encode_pairs(rows, self.tokenizer, self.seq_len, split)

    def batch(self, trainer, examples) -> dict:
        groups = [(e["prompt_ids"], [e["chosen_ids"], e["rejected_ids"]]) for e in examples]
        return self.shared(trainer, groups, score_prompt=self.loss_type == "orpo")

    def prepare(self, trainer) -> None:
        if self.needs_reference and self.options.precompute_ref:
            for chunk, sums in self.reference_sums(trainer):
                for example, chosen, rejected in zip(chunk, *sums.chunk(2)):
                    example["ref_chosen_logps"], example["ref_rejected_logps"] = float(chosen), float(rejected)

    def _loss(self, trainer, examples, grad: bool):
        o, n = self.options, len(examples)
        batch = self.batch(trainer, examples)
        scored = batch["positions"].numel()
        if self.loss_type == "orpo":  # the chosen prompts' tokens too, for the NLL
            logps = self.logps(trainer, batch, grad, torch.cat([batch["positions"], batch["prompt_positions"]]),
                               torch.cat([batch["targets"], batch["prompt_targets"]]))
        else:
            logps = self.logps(trainer, batch, grad)
        sums, counts = segment_sums(logps[:scored], batch), batch["lengths"].float()
        chosen, rejected = sums[:n], sums[n:]
        extra = {}
        if self.loss_type == "orpo":
            nll = -(chosen.sum() + logps[scored:].sum()) / (counts[:n].sum() + logps.numel() - scored).clamp(min=1)
            loss, r_chosen, r_rejected, log_odds = orpo_loss(chosen / counts[:n].clamp(min=1),
                                                             rejected / counts[n:].clamp(min=1), nll, beta=o.beta)
            extra = {"log_odds_ratio": float(log_odds), "nll_loss": float(nll)}
        elif self.loss_type == "simpo":
            loss, r_chosen, r_rejected = simpo_loss(chosen / counts[:n].clamp(min=1), rejected / counts[n:].clamp(min=1),
                                                    beta=o.beta, gamma=o.simpo_gamma, label_smoothing=o.label_smoothing)
            if o.cpo_alpha:
                loss = loss + o.cpo_alpha * -(chosen.sum() / counts[:n].sum().clamp(min=1))
        else:
            if "ref_chosen_logps" in examples[0]:
                ref_chosen = torch.tensor([e["ref_chosen_logps"] for e in examples], device=sums.device)
                ref_rejected = torch.tensor([e["ref_rejected_logps"] for e in examples], device=sums.device)
            else:
                ref_chosen, ref_rejected = segment_sums(self.reference_logps(trainer, batch), batch).chunk(2)
            loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type,
                                                  beta=o.beta, label_smoothing=o.label_smoothing,
                                                  chosen_tokens=counts[:n], rejected_tokens=counts[n:])
        # the policy's own ranking: summed log-probabilities (per-token means for the length-normalised losses)
        ranked = chosen / counts[:n].clamp(min=1) > rejected / counts[n:].clamp(min=1) \
            if self.loss_type in ("orpo", "simpo") else chosen > rejected
        logs = {"rewards/chosen": float(r_chosen.mean()), "rewards/rejected": float(r_rejected.mean()),
                "rewards/accuracies": float((r_chosen > r_rejected).float().mean()),
                "rewards/margins": float((r_chosen - r_rejected).mean()),
                "logps/chosen": float(chosen.detach().mean()), "logps/rejected": float(rejected.detach().mean()),
                "preference_accuracy": float(ranked.float().mean()), **extra}
        return loss, int(batch["tokens"]), logs
