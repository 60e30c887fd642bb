"""LoRA and QLoRA with bf16 compute on a CPU without a bf16 unit: the frozen base's products in
emulated bf16 (as before kernels/cpu.py) against fp32 (``cpu.matmul`` / ``cpu.linear``), side by side
in one process.

    python -m benchmarks.bf16_emulation [--batch-size 2 --seq-len 96 --r 16 --repeats 3]

One training step (forward with the chunked loss, backward, AdamW) on SmolLM2-135M-Instruct with
LoRA on its seven projections, round-robin:
  - QLoRA, bf16 compute, bf16 products: the 4-bit base and the loss multiply in bf16 (what torch
    does on its own; emulated where the CPU has no AMX-BF16 / AVX512-BF16);
  - QLoRA, bf16 compute, as lorakit runs it (fp32 products where bf16 is emulated);
  - LoRA on a bf16 base (--bf16), the same two ways;
  - QLoRA, fp32 compute; and LoRA on the fp32 base (the floors).
On a CPU with a bf16 unit the first two are the same path.
"""

from __future__ import annotations

import argparse
import copy

import torch

import lorakit as lk
from lorakit.hub.models import load_model
from lorakit.kernels import cpu

from .common import SEVEN, interleaved, print_table


def step_fn(model, ids, bf16: bool, products_in_bf16: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    native = cpu._this_cpu_has_native_bf16

    def step():
        if products_in_bf16:  # torch's own bf16 products, as if the CPU had a bf16 unit
            cpu._this_cpu_has_native_bf16 = lambda: True
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = lk.causal_lm_loss(model, input_ids=ids, labels=ids)
            loss.backward()
        finally:
            cpu._this_cpu_has_native_bf16 = native
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base, _ = load_model("smollm2-135m", "lm")
    config = lk.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=SEVEN)

    def qlora(compute):
        model = lk.quantize(copy.deepcopy(base), compute_dtype=compute)
        model = lk.inject(model, config)
        if compute == torch.bfloat16:
            lk.cast_base(model, torch.bfloat16)
        return model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))
    bf16_model = qlora(torch.bfloat16)
    lora_bf16 = lk.cast_base(lk.inject(copy.deepcopy(base), config), torch.bfloat16).train()
    cases = {"QLoRA bf16, bf16 products": step_fn(bf16_model, ids, True, products_in_bf16=True),
             "QLoRA bf16, as lorakit runs it": step_fn(bf16_model, ids, True),
             "LoRA bf16 base, bf16 products": step_fn(lora_bf16, ids, True, products_in_bf16=True),
             "LoRA bf16 base, as lorakit runs it": step_fn(lora_bf16, ids, True),
             "QLoRA fp32": step_fn(qlora(torch.float32), ids, False),
             "LoRA, fp32 base": step_fn(lk.inject(copy.deepcopy(base), config).train(), ids, False)}
    times = interleaved(cases, repeats=args.repeats)
    unit = cpu.native_bf16()
    print_table(f"training step, batch {args.batch_size}x{args.seq_len}, r={args.r} on 7 projections, CPU bf16 unit: "
                f"{unit or 'none'} (median of {args.repeats}, interleaved)",
                [(k, f"{1e3 * v:.0f}", f"{v / times['QLoRA bf16, as lorakit runs it']:.2f}x") for k, v in times.items()],
                ("case", "ms/step", "vs lorakit's QLoRA bf16"))


if __name__ == "__main__":
    main()
