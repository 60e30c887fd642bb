"""A KV cache with one slot per request, for continuous batching.

transformers' DynamicCache and StaticCache keep every row of a batch at the same length and write
new tokens at one shared position, so a request can neither join a running batch nor leave it
without copying everyone's cache. Here each decoder layer owns two buffers of
slots × kv_heads × capacity × head_dim; a request keeps its slot from its first prompt chunk to its
last token, writes its keys and values at its own positions, and attends to its own columns through
a 4-D mask (which transformers' models take as given). Running requests sit in slots 0..n-1, so a
decoding step reads a plain view of the buffers, no gather; a finished request's slot is refilled
by moving the last one into it.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..errors import LoraError
from .attention import EXTRAS
from .checks import same_logits

GROWTH = 256  # columns added at a time: growing copies the buffers, so not every token


class SlotCache(Cache):
    def __init__(self, config, slots: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_layers = text.num_hidden_layers
        self.slots, self.dtype, self.device = slots, dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._starts = torch.zeros(0, dtype=torch.long)
        self._width = 0
        self._chunk_starts: list[int] = []  # each row's first column in a prompt-chunk forward
        self._common_start: int | None = None  # theirs when all rows share it
        self._packed: PackedPlan | None = None  # set for a packed prefill forward (plan_packed)

    # --- what transformers calls ---------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write this forward's keys and values at each row's positions; return the rows' columns
        0..width (shorter rows' extra columns are masked out)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows, tokens = self._rows, key_states.shape[2]
        if self._packed is not None:  # one row of several prompts: each prompt's part into its slot
            plan = self._packed
            for slot, start, length, offset in plan.segments():
                keys[slot, :, start:start + length] = key_states[0, :, offset:offset + length].to(self.dtype)
                values[slot, :, start:start + length] = value_states[0, :, offset:offset + length].to(self.dtype)
            return key_states, value_states  # the attention reads the slots itself (PackedPlan.attend)
        if tokens == 1:  # decoding: one token per row, each at its own position
            slot_ids = torch.arange(rows.start, rows.stop, device=self.device)
            keys[slot_ids, :, self._starts] = key_states[:, :, 0].to(self.dtype)
            values[slot_ids, :, self._starts] = value_states[:, :, 0].to(self.dtype)
        elif self._common_start is not None:  # prompt chunks that start together: one write
            start = self._common_start
            keys[rows, :, start:start + tokens] = key_states.to(self.dtype)
            values[rows, :, start:start + tokens] = value_states.to(self.dtype)
        else:  # rows after cached prefixes of different lengths: a write per row
            for member, start in enumerate(self._chunk_starts):
                keys[rows.start + member, :, start:start + tokens] = key_states[member].to(self.dtype)
                values[rows.start + member, :, start:start + tokens] = value_states[member].to(self.dtype)
        return keys[rows, :, : self._width], values[rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def __len__(self) -> int:
        return self.num_layers

    # --- what the scheduler calls -----------------------------------------------------------------
    def plan(self, rows: slice, starts: torch.Tensor, tokens: int) -> torch.Tensor:
        """Set up the next forward: ``rows`` (a slot range), each row's first new position and the
        number of new tokens per row. Returns the 4-D additive mask the forward needs."""
        ends = starts + tokens
        self._ensure(int(ends.max()))
        self._rows, self._starts, self._width = rows, starts.to(self.device), int(ends.max())
        self._packed = None
        if tokens > 1:
            self._chunk_starts = starts.tolist()
            self._common_start = self._chunk_starts[0] if len(set(self._chunk_starts)) == 1 else None
        columns = torch.arange(self._width, device=self.device)
        query = starts.to(self.device).unsqueeze(1) + torch.arange(tokens, device=self.device)  # rows × tokens
        allowed = columns.view(1, 1, -1) <= query.unsqueeze(-1)  # causal within and up to each row's end
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask.unsqueeze(1)  # rows × 1 × tokens × width

    def plan_packed(self, first_slot: int, starts: list[int], lengths: list[int]) -> "PackedPlan":
        """Set up a packed prefill forward: prompt i's ``lengths[i]`` new tokens go to slot
        ``first_slot + i`` from column ``starts[i]`` on, all of them laid end to end in one row."""
        ends = [start + length for start, length in zip(starts, lengths)]
        self._ensure(max(ends))
        self._rows, self._width = slice(first_slot, first_slot + len(starts)), max(ends)
        self._packed = PackedPlan(self, list(range(first_slot, first_slot + len(starts))), list(starts), list(lengths))
        return self._packed

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` columns into slot ``target``."""
        if source == target or length == 0:
            return
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :length] = buffer[source, :, :length]

    def read(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Slot ``slot``'s keys and values of columns start..stop as one tensor
        (2 × layers × kv_heads × columns × head_dim): what a prefix cache keeps."""
        return torch.stack([torch.stack([buffer[slot, :, start:stop] for buffer in buffers])
                            for buffers in (self.keys, self.values)])

    def write(self, slot: int, start: int, block: torch.Tensor) -> None:
        """The inverse of ``read``: put ``block`` into slot ``slot`` from column ``start`` on."""
        stop = start + block.shape[3]
        self._ensure(stop)
        for kind, buffers in enumerate((self.keys, self.values)):
            for layer, buffer in enumerate(buffers):
                buffer[slot, :, start:stop] = block[kind, layer]

    def bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.keys + self.values)

    def reserve(self, budget_bytes: int, columns: int) -> int:
        """Allocate the buffers now for ``columns`` columns per slot (rounded up to GROWTH), or for
        as many as ``budget_bytes`` holds; the capacity reserved."""
        per_column = self.slots * self.kv_heads * self.head_dim * 2 * self.num_layers * self.dtype.itemsize
        wanted = -(-columns // GROWTH) * GROWTH
        fits = budget_bytes // per_column // GROWTH * GROWTH
        self._ensure(min(wanted, fits))
        return self.capacity

    def _ensure(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        capacity = -(-columns // GROWTH) * GROWTH
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for buffers in (self.keys, self.values):
            if not buffers:
                buffers.extend(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers))
                continue
            for i, old in enumerate(buffers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                grown[:, :, : self.capacity] = old
                buffers[i] = grown
        self.capacity = capacity


@dataclass
class PackedPlan:
    """A packed prefill forward's layout: prompt i fills columns starts[i]..starts[i] + lengths[i]
    of slot slots[i], and its tokens are positions offsets[i].. of the forward's single row."""

    cache: SlotCache
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    offsets: list[int] = field(init=False)
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.offsets = [0, *itertools.accumulate(self.lengths)][:-1]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def segments(self):
        return zip(self.slots, self.starts, self.lengths, self.offsets)

    def last_tokens(self) -> torch.Tensor:
        """Each prompt's last token's position in the row: the logits the forward keeps."""
        return torch.tensor([offset + length - 1 for offset, length in zip(self.offsets, self.lengths)])

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(start, start + length) for start, length in zip(self.starts, self.lengths)])

    def attend(self, module, query: torch.Tensor, scaling, **kwargs):
        """transformers' attention-function result for the packed row: each prompt's queries over
        its own slot's columns 0..its end (its cached prefix and itself), causal from its start."""
        if any(kwargs.get(name) is not None for name in EXTRAS):
            raise LoraError("packed prefill cannot run this model's attention (it adds a bias, soft cap or sinks)")
        keys, values = self.cache.keys[module.layer_idx], self.cache.values[module.layer_idx]
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])  # (batch, tokens, heads, dim)
        grouped = query.shape[1] != keys.shape[1]
        for slot, start, length, offset in self.segments():
            column = slice(0, start + length)
            if start == 0:  # no cached prefix: plain causal attention
                mask, causal = None, True
            else:  # query j sits at column start + j
                mask, causal = self._mask(start, length, query.device), False
            attended = F.scaled_dot_product_attention(
                query[:, :, offset:offset + length], keys[slot:slot + 1, :, column], values[slot:slot + 1, :, column],
                attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=grouped)
            out[0, offset:offset + length] = attended[0].transpose(0, 1)
        return out, None

    def _mask(self, start: int, length: int, device) -> torch.Tensor:
        key = (start, length)
        if key not in self._masks:  # the same for every layer of the forward
            self._masks[key] = torch.ones(length, start + length, dtype=torch.bool, device=device).tril(start)
        return self._masks[key]


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` in recent transformers (``past_key_values``
    still works there, with a deprecation warning), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out, keyword: str):
    """The KV cache a forward's output carries: under ``keyword`` where the model returns it so,
    as ``past_key_values`` otherwise."""
    return out[keyword] if keyword in out else out.past_key_values


def slot_forward(model, cache: SlotCache, slot: int, ids: torch.Tensor, start: int = 0):
    """One plain forward of ``ids`` (1-D) into slot ``slot`` of ``cache`` from column ``start`` on, as
    the scheduler runs a prompt chunk; the model's output. The start-up checks build their slot
    caches with it."""
    device = next(model.parameters()).device
    mask = cache.plan(slice(slot, slot + 1), torch.tensor([start]), len(ids))
    return model(input_ids=ids.unsqueeze(0).to(device), attention_mask=mask, use_cache=True,
                 position_ids=torch.arange(start, start + len(ids), device=device).unsqueeze(0),
                 **{cache_keyword(model): cache})


def slot_cache_fits(model, max_length: int) -> bool:
    """Whether the model writes its keys and values through ``Cache.update`` and takes a 4-D mask as
    given: a short prompt fed in two pieces through a SlotCache must give one plain forward's logits
    (otherwise the server falls back to static batching). The mask is full causal, so a model with
    sliding-window layers fits only when no request can outgrow the window."""
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ["sliding_attention"])
    if isinstance(window, int) and sliding and window < max_length:
        return False
    reference = next(model.parameters())
    ids = torch.arange(1, 6).unsqueeze(0).to(reference.device) % model.config.get_text_config().vocab_size
    try:
        with torch.inference_mode():
            plain = model(input_ids=ids).logits[0, -1]
            cache = SlotCache(model.config, 1, reference.dtype, reference.device)
            slot_forward(model, cache, 0, ids[0, :3])
            pieces = slot_forward(model, cache, 0, ids[0, 3:], start=3).logits[0, -1]
    except Exception:  # noqa: BLE001 - any failure means "does not fit"
        return False
    return same_logits(pieces, plain, reference.dtype)
