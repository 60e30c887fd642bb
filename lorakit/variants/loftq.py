"""LoftQ (Li et al. 2023, ``init_lora_weights="loftq"``): A and B start by absorbing the 4-bit
quantization error, so the quantized model plus its adapter starts near the full-precision one.

Alternating, ``loftq_iter`` times: Q = dequant(NF4(W − B·A)) (W itself the first time), then
B·A = the best rank-r approximation of W − Q (an SVD: B = U·√S, A = √S·Vᵀ over the top r). As PEFT
computes it, A and B are not divided by the scaling (PEFT's choice: the start is W ≈ Q + s·B·A
exactly only when lora_alpha equals r; `lorakit train --init loftq` defaults alpha to r for that).

On a full-precision layer the base weight is replaced by Q, quantized as bitsandbytes'
``Params4bit(compress_statistics=False)`` does (what PEFT's ``loftq_init`` uses), so the result
equals PEFT's on the same weights. On one of lorakit's 4-bit layers the full-precision weight
comes from the checkpoint the model was loaded from (hub/low_memory.py records where), the NF4 is
the layer's own (double-quantized constants), and the layer ends up holding NF4(W − B·A) from
the last round, so that what it computes with is exactly the Q the adapter compensates.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import check_loftq_config
from ..errors import ConfigError
from ..kernels.nf4 import BLOCK, NF4_CODE, Linear4bit, quantize_blocks


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(NF4(weight)) with one fp32 absmax per block of 64 (bitsandbytes' 4-bit format
    without double quantization, as PEFT's LoftQ quantizes), in fp32."""
    flat = weight.float().reshape(-1)
    padded = nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK))
    codes, absmax = quantize_blocks(padded)
    values = NF4_CODE.to(flat.device)[codes.long()].view(-1, BLOCK) * absmax.unsqueeze(1)
    return values.view(-1)[: flat.numel()].view(weight.shape)


def layer_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(NF4(weight)) as lorakit's Linear4bit stores it (double-quantized constants), fp32."""
    layer = Linear4bit(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    layer.set_weight(weight.float())
    return layer.dequantized_weight(torch.float32)


def loftq_factors(weight: torch.Tensor, r: int, num_iter: int,
                  round_trip: Callable[[torch.Tensor], torch.Tensor] = nf4_round_trip):
    """(what was quantized last, Q, A, B) for a weight (out×in): PEFT's alternating loop."""
    W = weight.float()
    quantized_input = W
    for i in range(num_iter):
        Q = round_trip(quantized_input)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = torch.sqrt(S[:r])
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        if i + 1 < num_iter:
            quantized_input = W - B @ A
    return quantized_input, Q, A, B


def check_loftq_target(base: nn.Module, path: str, has_source: bool) -> None:
    if isinstance(base, Linear4bit):
        if not has_source:
            raise ConfigError(f"loftq initialisation on {path!r}, a 4-bit layer that no longer holds its full-precision "
                              "weight: load the model with lorakit's QLoRA loader (lorakit train --qlora, or "
                              "lorakit.hub.models.load_model(..., quantize=dtype)), which records where the weights "
                              "are, or inject on the full-precision model and lk.quantize it afterwards.")
        return
    if type(base) is not nn.Linear:
        raise ConfigError(f"loftq initialisation on {path!r}, a {type(base).__name__}: lorakit's LoftQ initialises "
                          "nn.Linear layers (the ones QLoRA quantizes); leave the others out of target_modules.")


def loftq_init(layer, name: str, loftq_config: dict, full_weight: torch.Tensor | None = None) -> None:
    """Set adapter ``name``'s A, B by LoftQ and give the base the quantized weight they complement.
    ``full_weight``: the original weight of a 4-bit base (from its checkpoint)."""
    config = check_loftq_config(loftq_config)
    base = layer.base_layer
    A_param, B_param = layer.lora_pair(name)
    with torch.no_grad():
        if isinstance(base, Linear4bit):
            quantized_input, _, A, B = loftq_factors(full_weight.to(base.packed.device), layer.rank(name),
                                                     config["loftq_iter"], layer_round_trip)
            base.set_weight(quantized_input)  # dequantizes to exactly the Q above
        else:
            _, Q, A, B = loftq_factors(base.weight.detach(), layer.rank(name), config["loftq_iter"])
            base.weight.copy_(Q.to(base.weight.dtype))
        A_param.copy_(A)
        B_param.copy_(B)
