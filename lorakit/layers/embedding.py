"""LoRA around ``nn.Embedding``: A (r×num_embeddings) is looked up per token, B (dim×r) projects.

PEFT's names (``lora_embedding_A`` / ``lora_embedding_B``, plain parameters, no ``.weight`` in the
keys) and init (A zero, B normal: the lookup side starts at zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..variants.dora import DoraEmbedding
from .base import LoraLayer, lora_dims_of


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: A (r×num_embeddings) is looked up, B (dim×r) projects."""

    transpose_delta = True  # the embedding table is num_embeddings×dim, B@A is dim×num_embeddings
    dora_variant = DoraEmbedding
    pair_attributes = ("lora_embedding_A", "lora_embedding_B")  # plain parameters, as PEFT keeps them

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def lora_dims(self):
        return lora_dims_of(self.base_layer)

    def create_pair(self, name, r, dtype, device):
        num, dim = self.lora_dims()
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, dtype=dtype, device=device))

    def reset_adapter(self, name: str, init) -> None:
        A, B = self.lora_pair(name)
        with torch.no_grad():
            if init is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:  # as PEFT: the lookup side starts at zero, the projection random
                nn.init.zeros_(A)
                nn.init.normal_(B)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def add_lora(self, result, x, name):
        A, B = self.lora_pair(name)
        h = self._lookup(x, A.T) * self.scaling[name]
        return result + (h @ B.T).to(result.dtype)

    def add_mixed(self, result, x):
        batch = x.shape[0]
        rows = self.mixed.rows_for(batch)
        B_rows = self.mixed.B_stack.index_select(0, rows)
        # A_stack is slots×num_embeddings×r: pick each token's row from its own adapter's table.
        h = self.mixed.A_stack[rows.unsqueeze(1), x.reshape(batch, -1)]
        out = result + torch.bmm(h, B_rows).view(result.shape).to(result.dtype)
        if self.mixed.scale_stack is not None:  # DoRA rows scale their whole output; others by 1
            scale = self.mixed.scale_stack.index_select(0, rows).unsqueeze(1)
            out = (out.reshape(batch, -1, out.shape[-1]) * scale).view(result.shape).to(result.dtype)
        return out
