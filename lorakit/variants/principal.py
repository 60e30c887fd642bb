"""Initialisations that move the principal part of W0 into the adapter: PiSSA and OLoRA.

PiSSA (Meng et al. 2024, ``init_lora_weights="pissa"``): W0 = U·S·Vᵀ; with the top r triplets,
A = sqrt(S_r/s)·V_rᵀ and B = U_r·sqrt(S_r/s), so that s·B·A is W0's best rank-r part; the base
becomes the residual W0 − s·B·A. ``"pissa_niter_K"`` takes the triplets from torch's randomised
``svd_lowrank`` with K subspace iterations (much faster on large layers, slightly approximate).
OLoRA (Büyükakyüz 2024, ``"olora"``): W0 = Q·R; B = Q[:, :r], A = R[:r]; the base becomes
W0 − s·B·A. Both as PEFT computes them (fp32, the residual rounded back to the base's dtype),
so an adapter loads with the same outputs in either library.

The model starts equal to the base model, but the base it carries is no longer W0: an adapter
saved plainly only works on that residual base. ``initial_pair`` keeps (A0, B0) so that saving can
write the exact equivalent for the original base: ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0],
a rank-2r LoRA (PEFT's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import re

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..kernels.nf4 import Linear4bit

PRINCIPAL_INITS = re.compile(r"pissa|pissa_niter_\d+|olora")


def is_principal_init(init) -> bool:
    return isinstance(init, str) and PRINCIPAL_INITS.fullmatch(init) is not None


def check_principal_init(base, init, path: str) -> None:
    """Raise before anything changes if ``init`` cannot run on the base layer ``base``."""
    if not is_principal_init(init):
        return
    if isinstance(base, Linear4bit):
        raise ConfigError(f"{init} initialisation on {path!r}, a 4-bit base: the residual W0 − s·B·A must be "
                          "computed in full precision. Initialise on the 16/32-bit model, then lk.quantize it "
                          "(the residual is what gets quantized, as in PiSSA's QPiSSA recipe).")
    if init == "olora" and isinstance(base, Conv1D):
        raise ConfigError(f"olora initialisation on {path!r}, a GPT-2 Conv1D layer, is not supported (PEFT's "
                          "OLoRA does not transpose Conv1D weights either); use pissa, or the default init.")


def principal_init(layer, name: str, init: str) -> None:
    """Set A, B of adapter ``name`` from W0's principal part and leave the residual in the base."""
    weight = layer.base_layer.weight
    dtype, scaling, r = weight.dtype, layer.scaling[name], layer.rank(name)
    W = weight.detach().to(torch.float32)
    W = W.T if layer.fan_in_fan_out else W  # out×in
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    else:
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(W, r, niter=int(init.rsplit("_", 1)[1]))
            Vh = V.T
        root = torch.sqrt(S / scaling)
        A, B = root[:, None] * Vh, U * root[None, :]
    A_param, B_param = layer.lora_pair(name)
    with torch.no_grad():
        A_param.copy_(A)
        B_param.copy_(B)
        residual = W - scaling * (B @ A)
        weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(dtype))
    layer.__dict__.setdefault("_initial_pairs", {})[name] = (A_param.detach().clone(), B_param.detach().clone())


def initial_pair(layer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) of an adapter that PiSSA / OLoRA initialised in this process, else None."""
    return layer.__dict__.get("_initial_pairs", {}).get(name)
