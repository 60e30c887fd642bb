"""Inference overhead of LoRA over the base model: lorakit vs PEFT, side by side in one run.

    python -m benchmarks.inference [--shapes smollm2-135m llama-1024x12] [--repeats 7]

Random-init Llama models, batch 8x128, r=16 on the seven projections. Cases: base model; one
unmerged adapter; a mixed batch of 8 rows over 8 distinct adapters; the merged model. Times are
interleaved medians; ratios are to the base model measured in the same run.
"""

from __future__ import annotations

import argparse
import copy

import peft
import torch

import lorakit as lk

from .common import SEVEN, build_llama, interleaved, print_table


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def fwd_of(model, ids, **kw):
    return lambda: model(input_ids=ids, use_cache=False, **kw)


def mixed_fwd(model, ids, names):
    with lk.mixed_batch(model, names):
        model(input_ids=ids, use_cache=False)


def _rows(shape: str, t: dict) -> list[tuple]:
    b = t["base"]
    return [(shape, case, f"{sec * 1000:.0f}", f"{sec / b:.3f}") for case, sec in t.items()] + [
        (shape, "lorakit mixed / lorakit unmerged", "", f"{t['lorakit mixed'] / t['lorakit unmerged']:.3f}")]


def run(shape: str, repeats: int, batch: int, seq: int, rank: int, n_adapters: int,
        isolated: bool = False) -> list[tuple]:
    base = build_llama(shape)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq))
    names = [f"a{i}" for i in range(n_adapters)]
    rows_names = [names[i % n_adapters] for i in range(batch)]

    ours = copy.deepcopy(base)
    for i, name in enumerate(names):
        lk.inject(ours, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=SEVEN), name)
    randomize(ours)
    if isolated:  # only base and lorakit in the process: see BENCHMARKS.md on interference
        with torch.inference_mode():
            t = interleaved({"base": fwd_of(base, ids), "lorakit unmerged": fwd_of(ours, ids),
                             "lorakit mixed": lambda: mixed_fwd(ours, ids, rows_names)}, repeats=repeats)
        return _rows(shape, t)

    ours_merged = copy.deepcopy(ours)
    lk.merge(ours_merged, ["a0"])
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=SEVEN)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for name in names[1:]:
        theirs.add_adapter(name, cfg)
    randomize(theirs)
    theirs.set_adapter("a0")
    theirs.eval()
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter(["a0"])

    def fwd(model, **kw):
        return fwd_of(model, ids, **kw)

    def ours_mixed():
        mixed_fwd(ours, ids, rows_names)

    with torch.inference_mode():
        # correctness first: mixed rows equal single-adapter rows
        with lk.mixed_batch(ours, ["a0"] * batch):
            mixed_a0 = ours(input_ids=ids[:1].repeat(batch, 1), use_cache=False).logits
        single_a0 = ours(input_ids=ids[:1], use_cache=False).logits
        assert torch.allclose(mixed_a0[0], single_a0[0], atol=1e-3)
        t = interleaved({
            "base": fwd(base),
            "lorakit unmerged": fwd(ours),
            "peft unmerged": fwd(theirs),
            "lorakit mixed": ours_mixed,
            "peft mixed": fwd(theirs, adapter_names=rows_names),
            "lorakit merged": fwd(ours_merged),
            "peft merged": fwd(theirs_merged),
        }, repeats=repeats)
    b = t["base"]
    return _rows(shape, t) + [
        (shape, "lorakit overhead / peft overhead (mixed)", "",
         f"{(t['lorakit mixed'] - b) / max(t['peft mixed'] - b, 1e-9):.2f}"),
        (shape, "lorakit overhead / peft overhead (unmerged)", "",
         f"{(t['lorakit unmerged'] - b) / max(t['peft unmerged'] - b, 1e-9):.2f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-1024x12"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isolated", action="store_true", help="only base and lorakit models in the process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        rows += run(shape, args.repeats, args.batch, args.seq, args.rank, args.adapters, args.isolated)
    print_table(f"inference, batch {args.batch}x{args.seq}, r={args.rank} on 7 projections, "
                f"{args.threads} threads, interleaved medians of {args.repeats}",
                rows, ("model", "case", "ms", "x base"))


if __name__ == "__main__":
    main()
