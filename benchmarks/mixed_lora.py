"""The LoRA term of a mixed-adapter batch two ways, side by side (issue 26): gathering each row's
(A, B) pair and two batched matmuls (``MixedRows.row_pairs``), against multiplying every row by all
adapters side by side and masking each row to its own columns (``MixedRows.concatenated``).

    python -m benchmarks.mixed_lora

One 576 -> 576 projection (SmolLM2-135M's q_proj), adapters in fp32 as lorakit keeps them, the
base activations in bf16 and fp32; decoding (64 rows x 1 token) and prefill (16 rows x 256 tokens);
8, 16 and 100 adapters of rank 8. The server takes the concatenated path for one-token rows while
adapters x rank <= CONCAT_COLUMNS (lorakit/model/mixed.py), the gather everywhere else.
"""

from __future__ import annotations

import time

import torch

from .common import print_table


def timed(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
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
                rows.append((str(dtype).split(".")[1], f"{batch}x{tokens}", adapters, f"{g:.3f}", f"{c:.3f}",
                             f"{g / c:.2f}", f"{error:.1e}"))
    print_table("LoRA term of one mixed batch, ms per call (2 threads)", rows,
                ("base dtype", "rows x tokens", "adapters", "gather", "all at once", "gather / all", "max diff"))


if __name__ == "__main__":
    main()
