"""AdaLoRA on a whole model: the orthogonality penalty and the rank allocator (PEFT's semantics).

The rank allocator: importance scores, the cubic budget schedule, and masking.

Call ``lk.update_and_allocate(model, step)`` after every optimizer step (before zeroing the
gradients), as with PEFT's ``model.base_model.update_and_allocate(step)``:

- before ``total_step − tfinal``: update the importance EMAs from |w·∂L/∂w| of every A, B and Λ
  entry; every ``deltaT`` steps past ``tinit``, zero the Λ of the least important triplets so that
  the live ones fit the budget (init_r·n at ``tinit``, falling cubically to target_r·n);
- at ``total_step − tfinal``: mask to the target budget one last time and fix the pattern;
- after: keep the masked Λ at zero.

Triplet i of a layer scores S(λ_i) + mean_j S(Q_ij) + mean_k S(P_ki), with S = EMA(sensitivity) ×
EMA(uncertainty); the budget cut is the (n_total − budget)-th smallest score over all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..variants.adalora import AdaLoraConfig, is_adalora, orthogonal_penalty, rank_mask, set_rank_mask
from .state import lora_layers, registry


def adalora_penalty(model: nn.Module) -> torch.Tensor:
    """orth_reg_weight × the penalty of the model's trainable AdaLoRA adapter (0 if it has none): for
    training code that computes its loss outside the model's forward (the hook cannot see it)."""
    from ..model.state import lora_layers, registry

    for name, config in registry(model).configs.items():
        if is_adalora(config) and not config.inference_mode:
            layers = [layer for _, layer in lora_layers(model) if name in layer.lora_E]
            return config.orth_reg_weight * orthogonal_penalty(layers, name)
    return torch.zeros(())


def add_penalty_hook(model: nn.Module):
    """As PEFT's AdaLoraModel.forward: when the model's output carries a loss, add the weighted
    orthogonality penalty (adalora_penalty) to it. Returns the hook handle (removed when lorakit is
    unloaded)."""

    def hook(_module, _args, output):
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and torch.is_grad_enabled():
            output.loss = loss + adalora_penalty(model)
        return output

    return model.register_forward_hook(hook)


class RankAllocator:
    def __init__(self, model: nn.Module, name: str, config: AdaLoraConfig):
        self.name, self.config = name, config
        self.layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.lora_E]
        self.init_budget = sum(layer.lora_E[name].shape[0] for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets allowed, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def _parameters(self, layer):
        A, B = layer.lora_pair(self.name)
        return {"A": A, "B": B, "E": layer.lora_E[self.name]}

    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, layer in self.layers:
                for kind, param in self._parameters(layer).items():
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    sensitivity = (param * grad).abs()
                    key = (path, kind)
                    smoothed = self.sensitivity.get(key, torch.zeros_like(param))
                    smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
                    spread = self.uncertainty.get(key, torch.zeros_like(param))
                    self.uncertainty[key] = beta2 * spread + (1 - beta2) * (sensitivity - smoothed).abs()
                    self.sensitivity[key] = smoothed

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """One score per triplet of each layer (path -> r-vector)."""
        scores = {}
        for path, _ in self.layers:
            score = {kind: self.sensitivity[(path, kind)] * self.uncertainty[(path, kind)] for kind in ("A", "B", "E")}
            scores[path] = score["E"].view(-1) + score["A"].mean(dim=1) + score["B"].mean(dim=0)
        return scores

    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget).values.item()
        with torch.no_grad():
            for path, layer in self.layers:
                keep = scores[path] > threshold
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
                set_rank_mask(layer, self.name, keep.cpu())

    def keep_masked(self) -> None:
        with torch.no_grad():
            for _, layer in self.layers:
                keep = rank_mask(layer, self.name)
                if keep is not None:
                    layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1).to(layer.lora_E[self.name].device), 0.0)

    def step(self, step: int) -> None:
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self.update_importance()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.budget(step)[0])
            self.reset_importance()
        else:
            self.keep_masked()


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """Update AdaLoRA's importance scores and ranks after an optimizer step (see the module docstring)."""
    reg = registry(model)
    trainable = [n for n in reg.active if isinstance(reg.configs[n], AdaLoraConfig) and not reg.configs[n].inference_mode]
    if not trainable:
        raise ConfigError("update_and_allocate needs an active, trainable AdaLoRA adapter (lk.AdaLoraConfig).")
    name = trainable[0]
    if reg.allocator is None or reg.allocator.name != name:
        reg.allocator = RankAllocator(model, name, reg.configs[name])
    reg.allocator.step(global_step)


def current_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Live triplets per adapted layer (after masking; init_r before any)."""
    ranks = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_E:
            keep = rank_mask(layer, name)
            ranks[path] = int(keep.sum()) if keep is not None else layer.lora_E[name].shape[0]
    return ranks
