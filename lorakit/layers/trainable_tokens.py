"""Trainable tokens (PEFT's ``trainable_token_indices``): train a few rows of an embedding table.

Each adapter holds the *values* of its rows (``trainable_tokens_delta``, k×dim, initialised from
the base rows, as PEFT does), not differences: an embedding resized for new tokens draws random
new rows each time the model is built, and replacing rows gives the same result whatever was
drawn. The forward looks tokens up in the base table and swaps in the adapter's rows where a token
is one of its indices, which equals PEFT's lookup in a copy of the table with the rows replaced,
without copying the table on every step.

An output head that shares the embedding's weight (tied embeddings) gets a tied wrapper: it holds
no tensors of its own and replaces the logit columns of the same tokens with the same rows, so a
new token is read and predicted through one trained row (PEFT's tied ``TrainableTokensWrapper``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .per_thread import PerThread


class TrainableTokens(nn.Module):
    """An ``nn.Embedding`` (or a tied, bias-free ``nn.Linear`` output head) whose chosen rows train.

    ``original_module`` stays frozen; ``trainable_tokens_delta[name]`` holds adapter ``name``'s rows
    for ``token_indices[name]``; ``trainable_tokens_original[name]`` the base rows they replace
    (what unmerge writes back). A tied wrapper (``tied_to`` set) reads all three from the wrapper
    of the embedding it shares the weight with.
    """

    # per thread (layers/per_thread.py): serving workers run forwards of one model at once
    disabled = PerThread(False)
    mixed_names = PerThread(None)  # per-row adapter names during lk.mixed_batch

    effective_weight = True  # ``.weight`` is the weight the forward uses (the chunked loss reads it)

    def __init__(self, original_module: nn.Module, tied_to: "TrainableTokens | None" = None):
        super().__init__()
        self.original_module = original_module
        self.__dict__["tied"] = [tied_to] if tied_to is not None else []  # kept out of modules / state dicts
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Rows()
            self.token_indices: dict[str, list[int]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._slots: dict[tuple, torch.Tensor] = {}

    @property
    def tied_to(self) -> "TrainableTokens | None":
        return self.__dict__["tied"][0] if self.__dict__["tied"] else None

    def _owner(self) -> "TrainableTokens":
        return self.tied_to or self

    @property
    def deltas(self) -> nn.ParameterDict:
        return self._owner().trainable_tokens_delta

    @property
    def indices(self) -> dict[str, list[int]]:
        return self._owner().token_indices

    @property
    def adapter_names(self) -> list[str]:
        return list(self.indices)

    def __getattr__(self, name: str):
        # attribute reads (``.num_embeddings``, ``.embedding_dim``) answer as the wrapped module does
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            if "original_module" not in modules or name.startswith("trainable_tokens"):
                raise
            return getattr(modules["original_module"], name)

    # --- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, token_indices: list[int]) -> None:
        if self.tied_to is not None:
            return  # the embedding's wrapper owns the rows
        weight = self.original_module.weight
        rows = weight.detach()[torch.tensor(token_indices, device=weight.device)]
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.token_indices[name] = list(token_indices)
        self.trainable_tokens_delta[name] = nn.Parameter(rows.to(dtype, copy=True))
        self.trainable_tokens_original.put(name, rows.clone())

    def remove_adapter(self, name: str) -> None:
        if self.tied_to is None:
            del self.trainable_tokens_delta[name], self.token_indices[name]
            self.trainable_tokens_original.drop(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._slots = {k: v for k, v in self._slots.items() if k[0] != name}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What adapter ``name`` trains here (nothing for a tied wrapper: its rows are the embedding's)."""
        return [self.trainable_tokens_delta[name]] if self.tied_to is None and name in self.token_indices else []

    # --- merge: write the rows into the base table and back -------------------------------------
    def merge(self, names: list[str]) -> None:
        for name in names:
            if self.tied_to is None and name in self.indices:
                self._write_rows(name, self.deltas[name])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.tied_to is None and name in self.indices:
                self._write_rows(name, self.trainable_tokens_original.get(name))

    def _write_rows(self, name: str, rows: torch.Tensor) -> None:
        weight = self.original_module.weight
        with torch.no_grad():
            weight.index_copy_(0, self._index(name, weight.device), rows.to(weight.dtype))

    # --- forward -------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The table the forward uses: the base weight with the active adapter's rows in place."""
        base = self.original_module.weight
        name = self._in_use()
        if name is None:
            return base
        return base.index_copy(0, self._index(name, base.device), self.deltas[name].to(base.dtype))

    def _in_use(self) -> str | None:
        if self.disabled or self.merged_adapters:
            return None
        return next((n for n in self.active_adapters if n in self.indices), None)

    def forward(self, x, *args, **kwargs):
        out = self.original_module(x, *args, **kwargs)
        if self.mixed_names is not None and not self.disabled and not self.merged_adapters:
            return self._forward_mixed(x, out)
        name = self._in_use()
        return out if name is None else self._replace(x, out, name)

    def _forward_mixed(self, x, out):
        names = self.mixed_names
        repeat = x.shape[0] // len(names)
        row_names = [n for n in names for _ in range(repeat)]
        for name in dict.fromkeys(row_names):
            if name not in self.indices:
                continue  # the base, or an adapter without trainable tokens here
            rows = torch.tensor([i for i, n in enumerate(row_names) if n == name], device=out.device)
            out = out.index_copy(0, rows, self._replace(x.index_select(0, rows), out.index_select(0, rows), name))
        return out

    def _replace(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        rows = self.deltas[name]
        if isinstance(self.original_module, nn.Embedding):
            slot = self._slot_table(name, x.device)[x]
            picked = F.embedding(slot.clamp(min=0), rows)
            scale = getattr(self.original_module, "embed_scale", None)  # Gemma scales its lookups
            if scale is not None:
                picked = picked * scale.to(picked.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), picked.to(out.dtype), out)
        # a tied output head: the logit columns of these tokens come from the trained rows
        columns = F.linear(x.to(rows.dtype), rows).to(out.dtype)
        return out.index_copy(-1, self._index(name, out.device), columns)

    def _index(self, name: str, device) -> torch.Tensor:
        key = (name, "index", device)
        if key not in self._slots:
            self._slots[key] = torch.tensor(self.indices[name], device=device)
        return self._slots[key]

    def _slot_table(self, name: str, device) -> torch.Tensor:
        """token id -> its row in the adapter's rows, -1 for tokens the adapter does not train."""
        key = (name, "slot", device)
        if key not in self._slots:
            table = torch.full((self.original_module.num_embeddings,), -1, dtype=torch.long, device=device)
            table[self._index(name, device)] = torch.arange(len(self.indices[name]), device=device)
            self._slots[key] = table
        return self._slots[key]


class _Rows(nn.Module):
    """Per-adapter buffers (the base rows an adapter replaces), moved with the model by ``.to``."""

    def put(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def get(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def drop(self, name: str) -> None:
        del self._buffers[name]
