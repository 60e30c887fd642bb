"""Packed fp32 linear weights (kernels/packed_linear.py) against torch's F.linear, side by side (issue 26).

    python -m benchmarks.packed_linear [--threads 1,2] [--rows 1,2,4,8,16,32,64,128]

1. Every distinct linear shape of SmolLM2-135M (the rule's tuning data) and of a random-init
   LLaMA of another shape (hidden 1024, MLP 2816, vocab 32000: data it was not tuned on): one
   product of R rows through ``F.linear`` (torch's MKL path) and through the packed copy, median
   of repeated runs, ratio > 1 where packed is faster; ``*`` marks the row counts the rule packs.
2. Both models' one-token forwards of R rows (no KV cache: the linears and small ops of a decoding
   step) with ``pack_linears`` off and on, alternating.
"""

from __future__ import annotations

import argparse
import time


def median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.hub.models import load_model
    from lorakit.kernels.packed_linear import PackedLinear, pack_linears, packable, unpack_linears
    from lorakit.kernels.packed_linear import row_step as packed_linear_row_step

    rows_list = [int(r) for r in args.rows.split(",")]
    smollm, _ = load_model("smollm2-135m", "lm")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000))
    models = {"SmolLM2-135M (tuned on)": smollm.eval(), "LLaMA 1024/2816/32000 random (held out)": other.eval()}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n=== {threads} thread(s) ===")
        for title, model in models.items():
            print(f"\n{title}: ms per product, F.linear / packed (ratio; * = the rule packs these rows)")
            shapes = sorted({(m.in_features, m.out_features) for m in model.modules()
                             if isinstance(m, torch.nn.Linear)})
            with torch.inference_mode():
                for fan_in, fan_out in shapes:
                    linear = torch.nn.Linear(fan_in, fan_out, bias=False)
                    cells = []
                    if packable(linear):
                        pack_linears(linear)
                        steps = linear.packed_steps
                    for rows in rows_list:
                        x = torch.randn(rows, fan_in)
                        plain = median_ms(lambda: F.linear(x, linear.weight))
                        if type(linear) is not PackedLinear:
                            cells.append(f"{rows}: {plain:.3f}/–")
                            continue
                        packed = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(
                            x, linear.packed_weight(), None, "none", [], ""))
                        cells.append(f"{rows}{'*' if packed_linear_row_step(rows) in steps else ''}: {plain:.3f}/{packed:.3f} "
                                     f"({plain / packed:.2f})")
                    print(f"  {fan_in:>5} → {fan_out:<6} " + "  ".join(cells), flush=True)
            print(f"{title}: one-token forward of R rows, ms, torch's linears / pack_linears (ratio), two rounds")
            for rows in rows_list:
                ids = torch.randint(100, 30000, (rows, 1))
                results = []
                for _ in range(2):
                    with torch.inference_mode():
                        unpack_linears(model)
                        plain = median_ms(lambda: model(input_ids=ids, use_cache=False), 9)
                        pack_linears(model)
                        packed = median_ms(lambda: model(input_ids=ids, use_cache=False), 9)
                    results.append(f"{plain:.1f} / {packed:.1f} ({plain / packed:.2f})")
                print(f"  {rows:>4} rows: " + "   ".join(results), flush=True)
            unpack_linears(model)


if __name__ == "__main__":
    main()
