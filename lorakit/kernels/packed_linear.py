"""Small-batch products of a frozen fp32 ``nn.Linear`` through oneDNN's packed weights.

torch runs an fp32 ``F.linear`` on CPU through MKL. For a handful of rows (a server's decoding step)
MKL is slow on some CPUs: on this AMD EPYC (AVX2), 2-8 rows through SmolLM2's 49152 × 576 LM head
take 2-2.5× as long as one row, although the weight is read once either way, and its MLP weights run
1.2-2× slower than oneDNN's GEMM over the same weight reordered into its blocked layout
(``torch.ops.mkldnn``: the packed weights torch's own compiler uses for frozen CPU linears). With
more rows the arithmetic dominates and MKL catches up: with one thread (a server with two busy
workers) the packed product loses from about 16 rows on, except for LM-head-sized weights, which
gain up to 128 rows; thin weights (576 → 192, the KV projections) lose at every row count to
oneDNN's fixed cost per call. ``PackedLinear`` keeps a packed copy of its weight beside it and takes
it for the row counts and sizes where it measured faster (BENCHMARKS.md, issue 26); everything
else, and anything that records gradients, goes through ``F.linear`` as before. The packed copy is
rebuilt when the weight changes (``versions.change_key``), so a merge or an in-place update never
reads a stale copy. The results equal ``F.linear``'s up to fp32 rounding.

``pack_linears(model)`` turns a model's plain fp32 CPU ``nn.Linear`` modules into ``PackedLinear``
(same parameters, same state dict; extra memory: one more copy of their weights) and
``unpack_linears`` turns them back.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .versions import change_key

# Where the packed product measured faster at both 1 and 2 threads on an AVX2 EPYC (fp32; tuned on
# SmolLM2-135M's shapes, checked on a LLaMA of other shapes; benchmarks/packed_linear.py,
# BENCHMARKS.md, issue 26): the rule when nothing was measured on the CPU at hand (``calibrate``).
SMALL_WEIGHT = 256 * 1024  # fewer weight elements: oneDNN's cost per call outweighs its GEMM
LARGE_WEIGHT = 8 * 2**20  # LM-head-sized weights: faster at every row count up to LARGE_ROWS
ROWS = (2, 8)  # rows (tokens in the batch) for the weights in between
LARGE_ROWS = (1, 128)
# Row counts ``calibrate`` times, each standing for the counts above the one before (3-4 rows run as
# 4 do); past the last one, as the last. LM-head-sized weights stop at 128: a server's forwards keep
# the logits of a few tokens a row.
ROW_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CALIBRATE_GAIN = 1.1  # packed where it measured at least this much faster (a margin for timing noise)
# Measured, thinner weights can gain too (SmolLM2's 576 -> 192 KV projections: oneDNN 1.7-2.4x MKL
# from 32 rows up on an AVX512 EPYC, never faster on the AVX2 one)
CALIBRATE_MIN = 64 * 1024


def row_step(rows: int) -> int:
    """The smallest of ROW_STEPS at or above ``rows`` (the last one past it)."""
    return min(1 << max(rows - 1, 0).bit_length(), ROW_STEPS[-1])


def default_steps(weight_elements: int) -> frozenset[int]:
    """The row steps the fixed rule packs, for a weight of this many elements."""
    low, high = LARGE_ROWS if weight_elements >= LARGE_WEIGHT else ROWS
    return frozenset(step for step in ROW_STEPS if low <= step <= high)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packable(module: nn.Module, minimum: int | None = None) -> bool:
    """A plain fp32 CPU ``nn.Linear`` whose weight is large enough to gain from packing (``minimum``
    elements; SMALL_WEIGHT when nothing was measured)."""
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu" and module.weight.numel() >= (minimum or SMALL_WEIGHT))


class PackedLinear(nn.Linear):
    """``nn.Linear`` that multiplies a few rows at a time through a packed copy of its weight.
    Made from an existing ``nn.Linear`` by ``pack_linears``, never constructed directly."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // self.in_features if input.dim() else 0
        # (a model moved to another device or dtype after packing takes torch's path too)
        if (row_step(rows) not in self.packed_steps or torch.is_grad_enabled() or input.dtype != torch.float32
                or not input.is_cpu):
            return F.linear(input, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(input.reshape(rows, self.in_features), self.packed_weight(),
                                                 self.bias, "none", [], "")
        return out.view(*input.shape[:-1], self.out_features)

    def packed_weight(self) -> torch.Tensor:
        key = change_key(self.weight)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            # the weight with the batch size oneDNN should block for (the middle of the range)
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16))
            self.__dict__["_packed"] = cached
        return cached[1]

    def __getstate__(self):
        # copies (deepcopy, pickle) leave the packed weight behind: oneDNN's opaque tensor has no
        # storage to copy; a copy packs its own on first use
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


def pack_linears(model: nn.Module, steps: dict[tuple[int, int], frozenset[int]] | None = None) -> int:
    """Turn ``packable`` modules of ``model`` into ``PackedLinear`` and pack their weights now; the
    number of weight elements packed (the extra memory, in fp32 elements). ``steps``: the row steps
    each (in, out) shape multiplies packed (``calibrate``'s; shapes with none stay plain), else the
    fixed rule's."""
    total = 0
    for module in model.modules():
        if steps is None:
            if not packable(module):
                continue
            chosen = default_steps(module.weight.numel())
        else:
            chosen = steps.get((module.in_features, module.out_features)) if packable(module, CALIBRATE_MIN) else None
            if not chosen:
                continue
        module.__class__ = PackedLinear
        module.packed_steps = chosen
        module.packed_weight()
        total += module.weight.numel()
    return total


def set_packed_steps(model: nn.Module, steps: dict[tuple[int, int], frozenset[int]]) -> int:
    """Give the PackedLinear modules of ``model`` these row steps per (in, out) shape; those with
    none become plain ``nn.Linear`` again (their copies freed). The weight elements still packed."""
    total = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.packed_steps = steps.get((module.in_features, module.out_features), frozenset())
            if module.packed_steps:
                total += module.weight.numel()
            else:
                _unpack(module)
    return total


def calibrated_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """The (in, out) shapes of ``model``'s weights that ``calibrate`` measures."""
    return {(m.in_features, m.out_features) for m in model.modules() if packable(m, CALIBRATE_MIN)}


def calibrate(model: nn.Module, repeats: int = 5,
              skip: frozenset[tuple[int, int]] = frozenset()) -> dict[tuple[int, int], frozenset[int]]:
    """Time F.linear against the packed product for each distinct ``packable`` shape of ``model``
    not in ``skip`` at each of ROW_STEPS (on this thread's torch threads, the two taking turns,
    medians): the steps where packed measured at least CALIBRATE_GAIN faster. Which one wins depends
    on the CPU: on an AVX2 EPYC MKL wins at 16-64 rows for mid-sized weights, on an AVX512 one
    oneDNN wins 2x almost everywhere (MKL takes no AVX512 path on AMD). 4-5 s for SmolLM2-135M's
    shapes and 33 s for LLaMA-7B's on one thread of the AVX2 EPYC, so a server keeps what it
    measured (serving/packed_calibration.py)."""
    shapes = {(fan_in, fan_out): fan_in * fan_out for fan_in, fan_out in calibrated_shapes(model) - skip}
    found = {}
    with torch.inference_mode():
        for (fan_in, fan_out), elements in shapes.items():
            numbers = torch.Generator().manual_seed(0)  # not the global generator: sampling seeds stay as they were
            weight = torch.randn(fan_out, fan_in, generator=numbers) * fan_in ** -0.5
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            wins = set()
            for step in ROW_STEPS:
                if elements >= LARGE_WEIGHT and step > LARGE_ROWS[1]:
                    break
                x = torch.randn(step, fan_in, generator=numbers)
                paths = (lambda: F.linear(x, weight),
                         lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
                times = ([], [])
                for round_ in range(repeats + 1):
                    for path, spent in zip(paths, times):
                        start = time.perf_counter()
                        path()
                        if round_:  # the first round warms up
                            spent.append(time.perf_counter() - start)
                plain, ours = (sorted(t)[len(t) // 2] for t in times)
                if plain >= CALIBRATE_GAIN * ours:
                    wins.add(step)
            found[(fan_in, fan_out)] = frozenset(wins)
    return found


def unpack_linears(model: nn.Module) -> None:
    """Undo ``pack_linears``: plain ``nn.Linear`` modules again, their packed copies freed."""
    for module in model.modules():
        if type(module) is PackedLinear:
            _unpack(module)


def _unpack(module: PackedLinear) -> None:
    module.__class__ = nn.Linear
    module.__dict__.pop("_packed", None)
    module.__dict__.pop("packed_steps", None)


def packed_elements(model: nn.Module, measured: bool = False) -> int:
    """Weight elements ``pack_linears`` would copy at most (to check the memory before packing):
    with the fixed rule, or (``measured``) wherever ``calibrate`` may find a gain."""
    return sum(m.weight.numel() for m in model.modules() if packable(m, CALIBRATE_MIN if measured else None))
