"""KTO on unpaired completions marked desirable or not (TRL's KTOTrainer, loss_type="kto").

The KL baseline pairs each prompt with another row's completion (the row before it, cyclically);
its log-ratio under the policy is taken without gradient, as TRL does.
"""

from __future__ import annotations

import torch

from ...kernels.logprobs import shifted_targets
from .base import Objective
from .data import collate_completions, encode_unpaired
from .losses import kto_loss


class Kto(Objective):
    task = "kto"

    def encode(self, rows, split):
        return encode_unpaired(rows, self.tokenizer, self.seq_len, split)

    def prepare(self, trainer) -> None:
        if self.options.precompute_ref:
            for examples in trainer.encoded.values():
                for start in range(0, len(examples or []), self.batch_eval):
                    chunk = examples[start:start + self.batch_eval]
                    for key, name in (("completion_ids", "ref_logps"), ("kl_ids", "ref_kl_logps")):
                        batch = trainer.dist.to_device(collate_completions(chunk, self.pad_id, key))
                        sums = self.reference_logps(trainer, batch, shifted_targets(batch["input_ids"], batch["completion_mask"])).sum(1)
                        for example, value in zip(chunk, sums):
                            example[name] = float(value)

    def _loss(self, trainer, examples, grad: bool):
        o, device = self.options, trainer.dist.device
        batch = trainer.dist.to_device(collate_completions(examples, self.pad_id))
        kl_batch = trainer.dist.to_device(collate_completions(examples, self.pad_id, "kl_ids"))
        targets = shifted_targets(batch["input_ids"], batch["completion_mask"])
        kl_targets = shifted_targets(kl_batch["input_ids"], kl_batch["completion_mask"])
        runner = trainer.wrapped if grad else trainer.runner_module
        with self.autocast(trainer), torch.enable_grad() if grad else torch.no_grad():
            logps = runner(batch["input_ids"], batch["attention_mask"], targets).sum(1)
        with torch.no_grad(), self.autocast(trainer):
            kl_logps = trainer.runner_module(kl_batch["input_ids"], kl_batch["attention_mask"], kl_targets).sum(1)
        if "ref_logps" in examples[0]:
            ref_logps = torch.tensor([e["ref_logps"] for e in examples], device=device)
            ref_kl = torch.tensor([e["ref_kl_logps"] for e in examples], device=device)
        else:
            ref_logps = self.reference_logps(trainer, batch, targets).sum(1)
            ref_kl = self.reference_logps(trainer, kl_batch, kl_targets).sum(1)
        desirable = torch.tensor([e["label"] for e in examples], device=device)
        loss, r_chosen, r_rejected, kl = kto_loss(logps, ref_logps, desirable, kl_logps, ref_kl, beta=o.beta,
                                                  desirable_weight=o.desirable_weight,
                                                  undesirable_weight=o.undesirable_weight)
        logs = {"kl": float(kl)}
        if r_chosen.numel():
            logs["rewards/chosen"] = float(r_chosen.mean())
        if r_rejected.numel():
            logs["rewards/rejected"] = float(r_rejected.mean())
        # a desirable completion should score above 0 (the reference), an undesirable one below
        logs["preference_accuracy"] = float(torch.cat([r_chosen > 0, r_rejected < 0]).float().mean())
        return loss, int(batch["attention_mask"].sum()), logs
