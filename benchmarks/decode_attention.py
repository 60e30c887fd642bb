"""A decoding step's attention: lorakit's kernel (kernels/decode_attention.py) against torch's SDPA
as the engine ran it before (grouped heads, the padded 4-D mask), side by side (issue 26).

    python -m benchmarks.decode_attention [--threads 1,2] [--rows 1,8,24,64] [--rounds 7] [--dtypes fp32,bf16]

A slot cache's buffers for 30 layers (slots × KV heads × columns × head size, fp32 or bf16), R rows whose
lengths are the serving anchor workload's prompt lengths plus 0-31 generated tokens, and one
decoding step's attention over all 30 layers, each layer's keys and values read once, as in a
step (so from memory, not cache). The cases take turns each round (``common.interleaved``); ms per
layer, and SDPA / kernel (> 1: the kernel is faster). Head shapes: SmolLM2-135M's 9 query / 3 KV
heads of 64 (the kernel was tuned on these), then shapes it was not tuned on: LLaMA-7B's 32 / 32
of 128 and Llama-3-8B's 32 / 8 of 128, at 16 rows (their caches are 4-8× larger a row).
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
import torch.nn.functional as F

from .common import interleaved, print_table

LAYERS = 30
HEADS = {"SmolLM2-135M 9/3x64 (tuned on)": (9, 3, 64), "LLaMA-7B 32/32x128 (held out)": (32, 32, 128),
         "Llama-3-8B 32/8x128 (held out)": (32, 8, 128)}


def anchor_lengths(count: int, seed: int = 0) -> list[int]:
    """``count`` rows' cached columns: an anchor prompt's tokens plus 0-31 generated ones."""
    from lorakit.hub.models import load_model

    from .serving import anchor_prompt_ids
    _, tokenizer = load_model("smollm2-135m", "lm")
    prompts = [len(ids) for ids in anchor_prompt_ids(tokenizer, 64)]
    rng = random.Random(seed)
    return [rng.choice(prompts) + rng.randrange(32) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,8,24,64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    from lorakit.kernels.decode_attention import load

    with tempfile.TemporaryDirectory() as folder:
        kernel, how = load(folder)
        if kernel is None:
            raise SystemExit(f"the kernel is not usable here: {how}")
        lengths_all = anchor_lengths(64)
        for threads, dtype_name in [(int(t), d) for d in args.dtypes.split(",") for t in args.threads.split(",")]:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            torch.set_num_threads(threads)
            results = []
            for title, (heads, kv_heads, dim) in HEADS.items():
                for rows in [int(r) for r in args.rows.split(",")] if "tuned on" in title else [16]:
                    lengths = torch.tensor(lengths_all[:rows])
                    width = int(lengths.max())
                    torch.manual_seed(0)
                    caches = [tuple(torch.randn(rows, kv_heads, width + 64, dim, dtype=dtype) for _ in range(2))
                              for _ in range(LAYERS)]
                    query = torch.randn(rows, 1, heads, dim, dtype=dtype).transpose(1, 2)
                    mask = torch.zeros(rows, 1, 1, width, dtype=dtype)
                    mask.masked_fill_((torch.arange(width) > lengths.view(-1, 1) - 1).view(rows, 1, 1, width),
                                      torch.finfo(dtype).min)

                    def sdpa():
                        for keys, values in caches:
                            F.scaled_dot_product_attention(query, keys[:, :, :width], values[:, :, :width],
                                                           attn_mask=mask, enable_gqa=heads != kv_heads
                                                           ).transpose(1, 2).contiguous()

                    def lorakit():
                        for keys, values in caches:
                            kernel.attend(query, keys[:, :, :width], values[:, :, :width], lengths, width, dim ** -0.5)
                    keys, values = caches[0]
                    expected = F.scaled_dot_product_attention(query, keys[:, :, :width], values[:, :, :width],
                                                              attn_mask=mask, enable_gqa=heads != kv_heads).transpose(1, 2)
                    error = (kernel.attend(query, keys[:, :, :width], values[:, :, :width], lengths, width,
                                           dim ** -0.5).float() - expected.float()).abs().max().item()
                    times = interleaved({"sdpa": sdpa, "kernel": lorakit}, repeats=args.rounds)
                    real = int(lengths.sum()) / (rows * width)
                    results.append((title, rows, f"{real:.2f}", f"{times['sdpa'] / LAYERS * 1e3:.3f}",
                                    f"{times['kernel'] / LAYERS * 1e3:.3f}", f"{times['sdpa'] / times['kernel']:.2f}",
                                    f"{error:.1e}"))
            print_table(f"{dtype_name}, {threads} thread(s): ms per layer (median of {args.rounds} interleaved rounds); "
                        f"the kernel {how.split(' in ')[0]}, vectorised: {kernel.vectorised}", results,
                        ("heads", "rows", "real/padded columns", "SDPA", "kernel", "SDPA/kernel", "max |diff|"))


if __name__ == "__main__":
    main()
