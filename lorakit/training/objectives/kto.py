"""KTO on unpaired completions marked desirable or not (TRL's KTOTrainer, loss_type="kto").

The KL baseline pairs each prompt with another row's completion (the row before it, cyclically);
its log-ratio under the policy is taken without gradient, as TRL does. A row's own completion and
its KL completion share the prompt, so one row holds the prompt once and both after it.
"""

from __future__ import annotations

import torch

from .base import Objective, segment_sums
from .data import encode_unpaired
from .losses import kto_loss


class Kto(Objective):
    task = "kto"

    def encode(self, rows, split):
        return encode_unpaired(rows, self.tokenizer, self.seq_len, split)

    def batch(self, trainer, examples) -> dict:
        return self.shared(trainer, [(e["prompt_ids"], [e["completion_ids"], e["kl_ids"]]) for e in examples])

    def prepare(self, trainer) -> None:
        if self.options.precompute_ref:
            for chunk, sums in self.reference_sums(trainer):
                for example, value, kl_value in zip(chunk, *sums.chunk(2)):
                    example["ref_logps"], example["ref_kl_logps"] = float(value), float(kl_value)

    def _loss(self, trainer, examples, grad: bool):
        o, n, device = self.options, len(examples), trainer.dist.device
        batch = self.batch(trainer, examples)
        # one forward scores both: the row's own completion (with gradient) and its KL completion
        # (without: the policy's KL log-ratio carries no gradient, as in TRL)
        own = (batch["segment"] < n).float()
        logps = self.logps(trainer, batch, grad)
        both = segment_sums(logps * own + logps.detach() * (1 - own), batch)
        sums, kl_sums = both[:n], both[n:]
        if "ref_logps" in examples[0]:
            ref_logps = torch.tensor([e["ref_logps"] for e in examples], device=device)
            ref_kl = torch.tensor([e["ref_kl_logps"] for e in examples], device=device)
        else:
            ref_logps, ref_kl = segment_sums(self.reference_logps(trainer, batch), batch).chunk(2)
        desirable = torch.tensor([e["label"] for e in examples], device=device)
        loss, r_chosen, r_rejected, kl = kto_loss(sums, ref_logps, desirable, kl_sums, ref_kl, beta=o.beta,
                                                  desirable_weight=o.desirable_weight,
                                                  undesirable_weight=o.undesirable_weight)
        logs = {"kl": float(kl)}
        if r_chosen.numel():
            logs["rewards/chosen"] = float(r_chosen.mean())
        if r_rejected.numel():
            logs["rewards/rejected"] = float(r_rejected.mean())
        # a desirable completion should score above the reference, an undesirable one below
        logs["preference_accuracy"] = float(torch.cat([r_chosen > 0, r_rejected < 0]).float().mean())
        return loss, int(batch["tokens"]), logs
