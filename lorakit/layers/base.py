"""LoRA layers: a frozen base module plus any number of named low-rank adapters.

h = W0·x + s·B(A(dropout(x)))  with A: r×in, B: out×r and s = alpha/r (alpha/sqrt(r) for rsLoRA).

The wrapper keeps the original module as ``base_layer`` and the adapters in ``lora_A`` / ``lora_B``
(``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), the same attribute layout as PEFT,
so state-dict keys translate one-to-one to PEFT's adapter format.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import delta as arith
from ..errors import ConfigError
from ..kernels.nf4 import Linear4bit
from ..kernels.versions import tracked, versions
from ..variants.lora import LoraVariant
from .per_thread import PerThread, thread_buffers

LOW_PRECISION = (torch.float16, torch.bfloat16)


class MixedStacks(NamedTuple):
    """One layer's adapters stacked for mixed batches (model/mixed.py): slots×in×r Aᵀ, slots×r×out
    s·Bᵀ, each slot's dropout, and DoRA's per-slot output scales (None when no adapter uses DoRA)."""

    A: torch.Tensor
    B: torch.Tensor
    dropout: torch.Tensor
    scale: torch.Tensor | None


def conv1d_class():
    """transformers' GPT-2 Conv1D (weight stored in×out), imported lazily."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, conv1d_class(), Linear4bit))


def lora_dims_of(base: nn.Module) -> tuple[int, int]:
    """(k, d) of a base layer's LoRA pair, A: r×k and B: d×r."""
    if isinstance(base, nn.Embedding) or isinstance(base, conv1d_class()):
        return tuple(base.weight.shape)  # num_embeddings×dim, or Conv1D's in×out
    return base.in_features, base.out_features


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Train LoRA in fp32 on a 16-bit base: the update is tiny and would drown in bf16 rounding.
    return torch.float32 if weight.dtype in LOW_PRECISION or not weight.is_floating_point() else weight.dtype


class LoraLayer(nn.Module):
    """Common state of a LoRA-wrapped module: adapters, which are active, which are merged."""

    # True where the base weight is stored transposed relative to B@A (out×in).
    transpose_delta = False
    # the variant object each adapter gets: plain LoRA, or this layer type's DoRA (None: not offered)
    lora_variant = LoraVariant
    dora_variant = None
    # what the next forwards do, for the thread that set it (serving workers run forwards at once)
    disabled = PerThread(False)  # inside lk.disable_adapters
    mixed = PerThread(None)      # a mixed.MixedRows inside lk.mixed_batch (built there)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.dropout_rate: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}  # per adapter: what its variant computes (variants/)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (lorakit/variants/dora.py)
        self.lora_E = nn.ParameterDict()  # AdaLoRA's singular values, r×1 (lorakit/variants/adalora.py)
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    def __getattr__(self, name: str):
        # Model code reads attributes of the modules it owns (T5: ``self.wo.weight.dtype``); a wrapped
        # layer answers them as its base layer does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer")
            if base is None or name.startswith("lora_"):
                raise
            return getattr(base, name)

    # --- to implement per layer type ---------------------------------------------------------
    def create_pair(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def lora_dims(self) -> tuple[int, int]:
        """(k, d) with A: r×k and B: d×r."""
        raise NotImplementedError

    @classmethod
    def pair_shapes(cls, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B this layer type gives a rank-r adapter of ``base`` (before wrapping
        it: loading checks a file against them)."""
        k, d = lora_dims_of(base)
        return (r, k), (d, r)

    # --- the adapters' A and B, held in the two containers ``pair_attributes`` names ------------
    pair_attributes = ("lora_A", "lora_B")  # PEFT's attribute names, hence its state-dict keys

    def adapter_containers(self) -> tuple[nn.Module, nn.Module]:
        return getattr(self, self.pair_attributes[0]), getattr(self, self.pair_attributes[1])

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_containers()[0].keys())

    def lora_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) parameters of adapter ``name``: A is r×in, B is out×r (a module's weight, or
        the parameter itself where the container holds parameters)."""
        first, second = self.adapter_containers()
        A, B = first[name], second[name]
        return (A.weight, B.weight) if isinstance(A, nn.Module) else (A, B)

    # --- shared behaviour --------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, Linear4bit)

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight (for a 4-bit base: a dequantized fp32 copy, read-only in effect)."""
        if self.quantized:
            return self.base_layer.dequantized_weight(torch.float32)
        return self.base_layer.weight

    def reference(self) -> torch.Tensor:
        """A tensor with the base's compute dtype and device, which new adapters follow."""
        if self.quantized:
            return self.base_layer.packed.new_empty(0, dtype=self.base_layer.compute_dtype)
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init, use_dora: bool = False) -> None:
        if use_dora and self.dora_variant is None:
            raise ConfigError(f"DoRA is not offered for {type(self).__name__} layers; adapt them with plain LoRA.")
        weight = self.reference()
        self.create_pair(name, r, adapter_dtype(weight), weight.device)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_rate[name] = dropout
        self.scaling[name] = scaling
        self.reset_adapter(name, init)
        self.variants[name] = (self.dora_variant if use_dora else self.lora_variant)()
        self.variants[name].init(self, name)
        self.clear_mixed_cache()

    def uses_dora(self, name: str) -> bool:
        return self.variants[name].has_magnitude

    def dropout_p(self, name: str) -> float:
        """The dropout probability adapter ``name`` applies now (0 in eval mode)."""
        return self.dropout_rate[name] if self.training else 0.0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape (a 4-bit base's as it dequantizes: out×in)."""
        if self.quantized:
            return self.base_layer.out_features, self.base_layer.in_features
        return tuple(self.base_layer.weight.shape)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the update s·B·A uses them: AdaLoRA's SVD form P·Λ·Q folds Λ into A's rows."""
        A, B = self.lora_pair(name)
        return (A * self.lora_E[name], B) if name in self.lora_E else (A, B)

    def adapter_parameters(self, name: str) -> list[torch.Tensor]:
        """Everything adapter ``name`` trains in this layer: A, B, DoRA's magnitude, AdaLoRA's Λ."""
        extra = self.variants[name].parameters(self, name)
        extra += [self.lora_E[name]] if name in self.lora_E else []
        return [*self.lora_pair(name), *extra]

    def remove_adapter(self, name: str) -> None:
        if name in self.lora_E:
            del self.lora_E[name]
        self.variants.pop(name).remove(self, name)
        for container in (*self.adapter_containers(), self.lora_dropout):
            del container[name]
        del self.scaling[name], self.dropout_rate[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self.clear_mixed_cache()

    def rename_adapter(self, old: str, new: str) -> None:
        """Hold adapter ``old``'s state under ``new``: the same tensors and objects, no copies."""
        for container in (*self.adapter_containers(), self.lora_dropout, self.lora_E, self.lora_magnitude_vector):
            if old in container:
                container[new] = container.pop(old)
        for table in (self.scaling, self.dropout_rate, self.variants):
            table[new] = table.pop(old)
        self.active_adapters = [new if a == old else a for a in self.active_adapters]
        self.merged_adapters = [new if a == old else a for a in self.merged_adapters]
        self.clear_mixed_cache()

    def clear_mixed_cache(self) -> None:
        """Drop the stacked adapters and row buffers kept for mixed batches. A stack being built by
        another thread meanwhile is dropped at its next use too (the generation it read is old)."""
        self.__dict__["_mixed_generation"] = self.__dict__.get("_mixed_generation", 0) + 1
        self.__dict__.pop("_mixed_cache", None)
        self.__dict__.pop("_row_buffers", None)

    def row_buffers(self) -> dict:
        """The calling thread's reused output buffers of mixed batches."""
        return thread_buffers(self.__dict__, "_row_buffers")

    def rank(self, name: str) -> int:
        return self.lora_pair(name)[0].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the base weight's layout, in the adapter's (fp32 for a 16-bit base) precision."""
        A, B = self.lora_pair(name)
        return arith.lora_delta(A, B, self.scaling[name], E=self.lora_E[name] if name in self.lora_E else None,
                                shape=self.weight_shape, transposed=self.transpose_delta)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with adapter ``name`` folded in (fp32 for a 16-bit base: rounded once, by the caller)."""
        return self.variants[name].merged_weight(self, name, weight)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.variants[name].unmerged_weight(self, name, weight)

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken back out (on a copy)."""
        weight = self.base_weight.detach().clone()
        for name in reversed(self.merged_adapters):
            weight = self.unmerged_weight(name, weight)
        return weight

    def _pop_merged(self) -> None:
        name = self.merged_adapters.pop()
        self.variants[name].forget_merge(self, name)

    def merge(self, names: list[str]) -> None:
        with torch.no_grad():
            if self.quantized:  # lossy: the caller (lk.merge(requantize=True)) has warned
                weight = self.base_weight
                for name in names:
                    weight = self.merged_weight(name, weight)
                    self.merged_adapters.append(name)
                self.base_layer.set_weight(weight)
                return
            weight = self.base_weight
            for name in names:
                weight.copy_(self.merged_weight(name, weight))  # computed in fp32, rounded once
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            if self.quantized and self.merged_adapters:
                weight = self.base_weight
                while self.merged_adapters:
                    weight = self.unmerged_weight(self.merged_adapters[-1], weight)
                    self._pop_merged()
                self.base_layer.set_weight(weight)
                return
            weight = self.base_weight
            while self.merged_adapters:
                weight.copy_(self.unmerged_weight(self.merged_adapters[-1], weight))
                self._pop_merged()

    def unmerged_active(self) -> list[str]:
        names = self.adapter_names
        return [a for a in self.active_adapters if a in names and a not in self.merged_adapters]

    def mixed_stacks(self, slot_names: list[str]) -> MixedStacks:
        """Stack the adapters for mixed batches: slot 0 = base (zeros); ranks padded to the largest.

        Cached across blocks (a server enters one per decoding step): valid while the slot names
        and scalings are the same and no parameter of the stacked adapters changed in place (their
        version counters: an optimizer step, a load); adding or removing an adapter clears it.
        """
        names = tuple(slot_names)
        scalings = tuple(self.scaling.get(n) for n in names)
        # read before anything else: an adapter overwritten while this builds (a server's hot swap,
        # which runs beside forwards of other adapters) bumps it, and the next block rebuilds
        generation = self.__dict__.get("_mixed_generation", 0)
        cached = self.__dict__.get("_mixed_cache")
        # the version check runs on every block (a Python loop over the parameters was a third of
        # entering a block over 120 layers)
        if (cached is not None and cached[0] == names and cached[1] == scalings and cached[5] == generation
                and versions(cached[2]) == cached[3]):
            return cached[4]
        held = set(self.adapter_names)
        present = [n for n in names if n in held]
        params = [p for n in present for p in self.adapter_parameters(n)]
        if any(self.uses_dora(n) for n in present):
            # DoRA's scales also read the base weight (a merge round trip rounds it)
            params.append(self.base_layer.packed if self.quantized else self.base_layer.weight)
        params = tracked(params)  # adapters loaded under inference_mode have no version counter
        seen = versions(params)  # before the values are read, for the same reason as the generation
        stacks = MixedStacks(*self._build_stacks(list(names), present), self.dora_scale_stack(list(names)))
        self.__dict__["_mixed_cache"] = (names, scalings, params, seen, stacks, generation)
        return stacks

    def dora_scale_stack(self, slot_names: list[str]) -> torch.Tensor | None:
        """Per slot, DoRA's m/‖W0 + s·B·A‖ (ones for the base and plain LoRA adapters); None when no
        adapter of the block uses DoRA here."""
        scales = {slot: self.variants[name].mixed_scale(self, name)
                  for slot, name in enumerate(slot_names, start=1) if name in self.variants}
        scales = {slot: scale for slot, scale in scales.items() if scale is not None}
        if not scales:
            return None
        stack = torch.ones(len(slot_names) + 1, self.lora_dims()[1], device=self.reference().device)
        for slot, scale in scales.items():
            stack[slot] = scale.flatten()
        return stack

    def _build_stacks(self, slot_names, present):
        # Stored pre-transposed (Aᵀ: in×r, s·Bᵀ: r×out) so a row gather is a plain index_select.
        # A layer may hold none of the block's adapters: its stacks are then all zeros (base only).
        # One stack per tensor, not a copy per slot: a server rebuilds every layer's stacks after
        # each adapter swap (slot-by-slot copies were 70 ms a swap over 120 layers).
        pairs = {name: self.factors(name) for name in present}
        r_max = max((A.shape[0] for A, _ in pairs.values()), default=1)
        in_dim, out_dim = self.lora_dims()
        dtype = next(iter(pairs.values()))[0].dtype if pairs else adapter_dtype(self.reference())
        device = self.reference().device
        no_A = torch.zeros(in_dim, r_max, dtype=dtype, device=device)
        no_B = torch.zeros(r_max, out_dim, dtype=dtype, device=device)
        A_parts, B_parts, scales, rates = [no_A], [no_B], [0.0], [0.0]
        with torch.no_grad():
            for name in slot_names:
                if name not in pairs:
                    A_parts.append(no_A)
                    B_parts.append(no_B)
                    scales.append(0.0)
                    rates.append(0.0)
                    continue
                A, B = pairs[name]
                missing = r_max - A.shape[0]  # ranks padded with zero columns / rows
                A, B = A.to(dtype), B.to(dtype)
                A_parts.append(F.pad(A.T, (0, missing)) if missing else A.T)
                B_parts.append(F.pad(B.T, (0, 0, 0, missing)) if missing else B.T)
                scales.append(self.scaling[name])
                rates.append(self.dropout_rate[name])
            A_stack = torch.stack(A_parts)
            # s·B in fp32 arithmetic, rounded once to the adapters' dtype, as B * s computes it
            scale = torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1)
            B_stack = (torch.stack(B_parts) * scale).to(dtype)
        return A_stack, B_stack, torch.tensor(rates, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.mixed is not None:  # lk.mixed_batch (model/mixed.py): each row its own adapter
            return self.add_mixed(result, x)
        for name in self.unmerged_active():
            result = self.variants[name].add(self, result, x, name)
        return result


class RowGroupedMixed:
    """For layers whose adapters cannot be gathered per row into one batched matmul (convolutions,
    whole-parameter updates): no stacks are built; ``add_mixed`` runs each adapter's rows together
    (``MixedRows.adapter_rows``), a loop over the batch's adapters, not its rows."""

    def mixed_stacks(self, slot_names):
        empty = self.reference().new_zeros(1, 1, 1, dtype=torch.float32)  # on the layer's device: rows go there
        return MixedStacks(empty, empty, empty.new_zeros(1), None)


class ModulePairLayer(LoraLayer):
    """A layer whose adapters are two modules each, ``lora_A[name]`` and ``lora_B[name]`` (PEFT's
    attribute names, hence its keys): linear layers, convolutions, parameters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
