"""The preference and RL losses, as pure functions of sequence (or token) log-probabilities.

Each follows TRL's definition of the same name (``trl`` is the test reference: tests/training/
objectives/ compare loss and gradients on the same batch): DPOTrainer's loss types, CPOTrainer's
SimPO, ORPOTrainer's odds-ratio term, KTOTrainer's loss and GRPOTrainer's clipped surrogate with
its aggregation types. The objectives (pairwise.py, kto.py, grpo.py) compute the log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
GRPO_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, loss_type: str, beta: float,
             label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """Mean DPO loss over the pairs, and the implicit rewards beta·(log π − log π_ref) of each side.
    Log-probabilities are sums over each completion's tokens; ``ipo`` divides the log-ratios by the
    completion lengths (``chosen_tokens`` / ``rejected_tokens``), as TRL does."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":  # label_smoothing: the probability that a preference label is flipped
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(DPO_LOSSES[:-1])}")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (TRL's CPOTrainer, loss_type="simpo"): reference-free, on per-token average
    log-probabilities, with a target margin gamma."""
    logits = (chosen_avg_logps - rejected_avg_logps) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean(), beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, beta: float):
    """ORPO: the chosen sequences' NLL minus beta times the mean log-sigmoid of the log odds ratio
    of per-token average log-probabilities; also returns the log odds ratio's mean."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - (beta * ratio).mean(), beta * chosen.detach(), beta * rejected.detach(), log_odds.mean().detach()


def kto_loss(logps, ref_logps, desirable, kl_logps, ref_kl_logps, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO on unpaired completions: ``desirable`` marks the good ones; the KL baseline is the mean
    log-ratio of mismatched (prompt, completion) pairs, detached and clamped at 0 (TRL)."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    return losses.nanmean(), beta * chosen.detach(), beta * rejected.detach(), kl


def group_advantages(rewards: torch.Tensor, group: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's standard
    deviation (Bessel-corrected, + 1e-4) with scale_rewards="group", the batch's with "batch", or
    not at all with "none". Rows of one group are consecutive."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale_rewards == "none":
        return torch.nan_to_num(rewards - mean, nan=0.0)
    values = grouped if scale_rewards == "group" else rewards.view(1, -1)
    centred = values - torch.nanmean(values, dim=1, keepdim=True)
    count = (~torch.isnan(values)).sum(1, keepdim=True)
    std = (torch.nanmean(centred ** 2, dim=1, keepdim=True) * count / (count - 1)).sqrt().squeeze(1)
    std = std.repeat_interleave(group) if scale_rewards == "group" else std.expand_as(rewards)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, beta: float, epsilon: float,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              tokens_in_batch: float | None = None):
    """GRPO's clipped surrogate per completion token, plus beta·KL(π‖π_ref) (k3 estimator, times
    the importance ratio as TRL's use_bias_correction_kl), aggregated as ``loss_type`` does:
    grpo = mean over sequences of each one's token mean; bnpo = mean over this batch's tokens;
    dr_grpo = sum / (sequences × max_completion_length); dapo = sum / ``tokens_in_batch`` (the
    completion tokens of the whole accumulated step, so micro-batches weigh by their tokens).
    Returns the loss and the mean per-token KL (0 when beta is 0)."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon_high if epsilon_high is not None else epsilon))
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.zeros((), device=logps.device)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * per_token_kl * ratio
        kl = (per_token_kl * mask).sum().detach() / mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / max(1.0, float(tokens_in_batch if tokens_in_batch is not None else mask.sum()))
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; choose one of {', '.join(GRPO_LOSSES)}")
    return loss, kl
