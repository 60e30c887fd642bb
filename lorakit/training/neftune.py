"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training, as transformers'
Trainer adds it for `neftune_noise_alpha`: each element drawn from U(-m, m) with m = alpha /
sqrt(seq_len * hidden) of the batch as padded; nothing in eval mode."""

from __future__ import annotations

import math

import torch


def noisy_embeddings(alpha: float):
    """A forward hook adding NEFTune's noise to an embedding module's output in training mode."""

    def hook(module, inputs, output):
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return hook


def add_neftune(model, alpha: float):
    """Hook the model's input embeddings (the LoRA wrapper when it has one); the handle removes it."""
    return model.get_input_embeddings().register_forward_hook(noisy_embeddings(alpha))
