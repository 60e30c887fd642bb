"""QLoRA on the real SmolLM2-135M-Instruct: NF4 round-trip error, memory, speed (issue 4).

    python -m benchmarks.qlora [--steps-batch 4 --seq-len 128 --repeats 5]

1. Quantization error of every linear weight (relative to its block's absmax), and, where
   bitsandbytes has a CPU build, agreement of codes and dequantized values with it.
2. Resident size of the model: fp32, bf16, and NF4 linear layers (rest bf16).
3. One training step (forward, backward, AdamW) of bf16 LoRA vs QLoRA vs fp32 LoRA, interleaved.
4. Forward of one 4-bit linear layer: lorakit vs bitsandbytes' CPU Linear4bit vs bf16 nn.Linear.
Training-loss quality (QLoRA vs bf16 LoRA, same steps and data) is in benchmarks.training_quality sft.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

import lorakit as lk
from lorakit.hub.models import load_model
from lorakit.kernels.nf4 import BLOCK, Linear4bit, unpack

from .common import SEVEN, interleaved, print_table


def nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += sum(b.numel() * b.element_size() for b in (m.packed, m.absmax_q, m.absmax_scale, m.absmax_offset))
        elif type(m) is nn.Linear and m is not getattr(model, "lm_head", None):
            total += m.weight.numel() * m.weight.element_size()
    return total


def quantization_error(model: nn.Module) -> dict:
    rel_sum, rel_max, count, agree, agree_total, bnb_max = 0.0, 0.0, 0, 0, 0, 0.0
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        bnb_f = None
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name == "lm_head":
            continue
        weight = m.weight.detach()
        q = Linear4bit.from_linear(m)
        flat = weight.reshape(-1)
        blocks = flat.view(-1, BLOCK)  # SmolLM2's sizes are multiples of 64
        absmax = blocks.abs().amax(1, keepdim=True)
        rel = ((q.dequantized_weight().reshape(-1, BLOCK) - blocks).abs() / absmax)
        rel_sum += float(rel.sum())
        rel_max = max(rel_max, float(rel.max()))
        count += rel.numel()
        if bnb_f is not None:
            packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
            agree += int((unpack(packed.view(-1)) == unpack(q.packed)).sum())
            agree_total += weight.numel()
            diff = (bnb_f.dequantize_4bit(packed, state) - q.dequantized_weight()).abs().reshape(-1, BLOCK) / absmax
            bnb_max = max(bnb_max, float(diff.max()))
    result = {"weights": count, "mean_abs_rel_to_absmax": rel_sum / count, "max_abs_rel_to_absmax": rel_max}
    if agree_total:
        result.update(bnb_code_agreement=agree / agree_total, bnb_max_dequant_diff_rel_to_absmax=bnb_max)
    return result


def train_step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.bf16_autocast):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench-out/qlora.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}

    base, _ = load_model("smollm2-135m", "lm")
    base.eval()
    results["error"] = quantization_error(base)
    e = results["error"]
    print_table("NF4 round trip on SmolLM2-135M linear weights (error relative to each block's absmax)",
                [("mean |w - deq(q(w))| / absmax", f"{e['mean_abs_rel_to_absmax']:.4f}"),
                 ("max  |w - deq(q(w))| / absmax", f"{e['max_abs_rel_to_absmax']:.4f}"),
                 *([("codes equal to bitsandbytes'", f"{100 * e['bnb_code_agreement']:.3f}%"),
                    ("max |deq_bnb - deq_lorakit| / absmax", f"{e['bnb_max_dequant_diff_rel_to_absmax']:.4f}")]
                   if "bnb_code_agreement" in e else [])], ("measure", "value"))

    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    nf4 = lk.quantize(copy.deepcopy(base).to(torch.bfloat16), compute_dtype=torch.bfloat16)
    bits = [m.storage_bits() for m in nf4.modules() if isinstance(m, Linear4bit)]
    results["memory"] = {"fp32": nbytes(base), "bf16": nbytes(bf16), "nf4": nbytes(nf4),
                         "linear_fp32": linear_bytes(base), "linear_bf16": linear_bytes(bf16),
                         "linear_nf4": linear_bytes(nf4), "bits_per_weight": sum(bits) / len(bits)}
    m = results["memory"]
    print_table("resident size of SmolLM2-135M (parameters + buffers; embeddings/head/norms unquantized)",
                [("fp32", f"{m['fp32'] / 1e6:.1f}", f"{m['linear_fp32'] / 1e6:.1f}"),
                 ("bf16", f"{m['bf16'] / 1e6:.1f}", f"{m['linear_bf16'] / 1e6:.1f}"),
                 ("NF4 linear + bf16 rest", f"{m['nf4'] / 1e6:.1f}", f"{m['linear_nf4'] / 1e6:.1f}")],
                ("model", "total MB", "linear weights MB"))
    print(f"linear weights NF4 / bf16 = {m['linear_nf4'] / m['linear_bf16']:.3f}; "
          f"{m['bits_per_weight']:.3f} bits per weight")

    config = lk.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=SEVEN)
    lora_bf16 = lk.cast_base(lk.inject(copy.deepcopy(base), config), torch.bfloat16)
    lora_bf16.bf16_autocast = True
    qlora = lk.inject(nf4, config)
    qlora.bf16_autocast = True
    lora_fp32 = lk.inject(copy.deepcopy(base), config)
    lora_fp32.bf16_autocast = False
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for model in (lora_bf16, qlora, lora_fp32):
        model.train()
    times = interleaved({"LoRA bf16": train_step_fn(lora_bf16, batch), "QLoRA (NF4, bf16 compute)": train_step_fn(qlora, batch),
                         "LoRA fp32": train_step_fn(lora_fp32, batch)}, repeats=args.repeats)
    results["train_step_s"] = times
    print_table(f"training step, batch {args.batch_size}x{args.seq_len}, r={args.r} on 7 projections (median of "
                f"{args.repeats}, interleaved)", [(k, f"{1e3 * v:.0f}", f"{v / times['LoRA bf16']:.2f}x")
                                                  for k, v in times.items()], ("case", "ms/step", "vs bf16 LoRA"))

    results["linear_forward_ms"] = linear_forward(base, args.batch_size * args.seq_len, args.repeats * 4)
    (args.out.parent).mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def linear_forward(base, tokens: int, repeats: int) -> dict:
    layer = base.model.layers[0].mlp.gate_proj  # 576 -> 1536
    x = torch.randn(tokens, layer.in_features, dtype=torch.bfloat16)
    ours = Linear4bit.from_linear(layer, torch.bfloat16)
    plain = copy.deepcopy(layer).to(torch.bfloat16)
    cases = {"bf16 nn.Linear": lambda: plain(x), "lorakit Linear4bit": lambda: ours(x)}
    try:
        import bitsandbytes as bnb

        theirs = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.bfloat16,
                                   quant_type="nf4", compress_statistics=True)
        theirs.weight = bnb.nn.Params4bit(layer.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True)
        theirs = theirs.to("cpu")
        theirs.weight = theirs.weight._quantize("cpu") if not theirs.weight.bnb_quantized else theirs.weight
        cases["bitsandbytes Linear4bit (CPU)"] = lambda: theirs(x)
    except Exception as exc:  # bitsandbytes missing or without a CPU build
        print(f"bitsandbytes not compared: {exc}")
    with torch.no_grad():
        times = interleaved(cases, repeats=repeats)
    print_table(f"forward of one 576->1536 linear, {tokens} tokens, bf16 (median of {repeats})",
                [(k, f"{1e3 * v:.2f}", f"{v / times['bf16 nn.Linear']:.2f}x") for k, v in times.items()],
                ("layer", "ms", "vs bf16 Linear"))
    return {k: 1e3 * v for k, v in times.items()}


if __name__ == "__main__":
    main()
