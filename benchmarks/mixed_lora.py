"""The LoRA term of a mixed-adapter batch three ways, side by side (issue 26): gathering each row's
(A, B) pair and two batched matmuls (``MixedRows.row_pairs``), multiplying every row by all
adapters side by side and masking each row to its own columns (``MixedRows.concatenated``), and,
for one-token rows, lorakit's kernel reading each row's own pair (kernels/mixed_lora.py, one thread).
Then whole decoding steps of SmolLM2-135M with 8 adapters (r=8 on q,k,v,o), one thread, 12 rows over
200 cached tokens: the base alone, the adapters through torch's GEMMs, through the kernel; taking turns.

    python -m benchmarks.mixed_lora [--steps-only]

One 576 -> 576 projection (SmolLM2-135M's q_proj), adapters in fp32 as lorakit keeps them, the
base activations in bf16 and fp32; decoding (64 rows x 1 token) and prefill (16 rows x 256 tokens);
8, 16 and 100 adapters of rank 8. The server takes the concatenated path for one-token rows while
adapters x rank <= CONCAT_COLUMNS (lorakit/model/mixed.py), the gather everywhere else.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import lorakit as lk
from lorakit.hub.models import load_model
from lorakit.kernels.mixed_lora import load
from lorakit.serving.slot_cache import cache_keyword, returned_cache

from .common import print_table


def timed(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def kernel_or_none():
    kernel, how = load(tempfile.mkdtemp())
    if kernel is None:
        print(f"the kernel is not built here ({how}): its columns stay empty")
    return kernel


def terms(kernel) -> None:
    torch.set_num_threads(2)
    rows = []
    width = 576
    for dtype in (torch.bfloat16, torch.float32):
        for batch, tokens in ((64, 1), (16, 256)):
            for adapters, rank in ((8, 8), (16, 8), (100, 8)):
                A = torch.randn(adapters + 1, width, rank) * 0.02
                B = torch.randn(adapters + 1, rank, width) * 0.02
                slots = torch.randint(1, adapters + 1, (batch,))
                x = torch.randn(batch, tokens, width, dtype=dtype)
                base = torch.randn(batch, tokens, width, dtype=dtype)

                def gather():
                    h = torch.bmm(x.to(A.dtype), A.index_select(0, slots))
                    return base + torch.bmm(h, B.index_select(0, slots)).to(dtype)
                A_cat = A[1:].permute(1, 0, 2).reshape(width, -1).contiguous()
                B_cat = B[1:].reshape(-1, width)
                own = ((slots.view(-1, 1) - 1) == torch.arange(adapters * rank) // rank).to(A.dtype).unsqueeze(1)

                def together():
                    return base + torch.matmul(torch.matmul(x.to(A.dtype), A_cat).mul_(own), B_cat).to(dtype)
                error = (gather().float() - together().float()).abs().max().item()
                g, c = timed(gather), timed(together)
                k = "-"
                if kernel is not None and tokens == 1:  # in the base's dtype, as the server runs it
                    A_own, B_own = A.transpose(1, 2).to(dtype).contiguous(), B.to(dtype).contiguous()
                    out, x2 = base.clone().view(batch, -1), x.view(batch, -1)
                    k = f"{timed(lambda: kernel.add(out, x2, A_own, B_own, slots)):.3f}"
                rows.append((str(dtype).split(".")[1], f"{batch}x{tokens}", adapters, f"{g:.3f}", f"{c:.3f}", k,
                             f"{g / c:.2f}", f"{error:.1e}"))
    print_table("LoRA term of one mixed batch, ms per call (2 threads; the kernel one)", rows,
                ("base dtype", "rows x tokens", "adapters", "gather", "all at once", "kernel", "gather / all",
                 "max diff"))


def steps(kernel, rounds: int = 12) -> None:
    """Whole decoding steps, base against 8 adapters two ways, one thread, taking turns."""
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_model("smollm2-135m", "lm", dtype=dtype)
        model.eval()
        names = [f"a{i}" for i in range(8)]
        for name in names:
            lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False), name)
        row_names = [names[i % 8] for i in range(12)]
        cases = {"base": lambda: lk.disable_adapters(model),
                 "8 adapters, GEMMs": lambda: lk.mixed_batch(model, row_names, stack=names)}
        if kernel is not None:
            cases["8 adapters, kernel"] = lambda: lk.mixed_batch(model, row_names, stack=names, kernel=kernel)
        with torch.inference_mode():
            with lk.disable_adapters(model):
                out = model(torch.randint(100, 20000, (12, 200)), use_cache=True)
                keyword = cache_keyword(model)  # `cache` in recent transformers, `past_key_values` before
                cache = returned_cache(out, keyword)
            step = torch.randint(100, 20000, (12, 1))
            times: dict[str, list[float]] = {case: [] for case in cases}
            for _ in range(rounds):
                for case, context in cases.items():
                    state = copy.deepcopy(cache)
                    with context():
                        start = time.perf_counter()
                        model(step, use_cache=True, **{keyword: state})
                        times[case].append(time.perf_counter() - start)
        middle = {case: sorted(t)[2:-2] for case, t in times.items()}
        base = sum(middle["base"]) / len(middle["base"])
        for case, kept in middle.items():
            mean = sum(kept) / len(kept)
            rows.append((str(dtype).split(".")[1], case, f"{mean * 1e3:.1f}", f"{mean / base:.3f}"))
    print_table("one decoding step, 12 rows over 200 cached tokens, SmolLM2-135M, 1 thread (trimmed mean of "
                f"{rounds})", rows, ("dtype", "case", "ms", "/ base"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-only", action="store_true", help="only the whole decoding steps")
    args = parser.parse_args()
    kernel = kernel_or_none()
    if not args.steps_only:
        terms(kernel)
    steps(kernel)


if __name__ == "__main__":
    main()
