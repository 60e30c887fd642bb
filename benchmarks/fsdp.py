"""FSDP vs DDP vs one process (issue 17): per-process peak memory, step time, and agreeing losses.

    python -m benchmarks.fsdp [--steps 8 --batch 4 --seq 256]

SmolLM2-135M-Instruct (real weights), `lorakit train --task sft` on the embedded rotten-tomatoes SFT
task, LoRA r=8 on all linear layers, bf16 frozen base with fp32 LoRA weights and AdamW state, the
same global batch everywhere: one process with 2x the batch, `torchrun --nproc_per_node 2` with
DDP, and with --fsdp (plus --fsdp --qlora). Each process runs on one thread (2 cores, 2 processes).
Peak memory is rank 0's peak resident memory above its resident memory before the model was
loaded (what `lorakit train` reports), beside `lorakit estimate`'s per-process prediction, and its
resident memory once the model is set up (loaded, adapted, sharded; optimizer built): the frozen
base as each process holds it while training. Step time
is the run's training seconds per step (no evaluation inside: --eval-steps past the end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import print_table


def run(output: Path, nproc: int, batch: int, args, *extra: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    command = [*launcher, "-m", "lorakit", "train", "--model", "smollm2-135m", "--data", "rotten-tomatoes",
               "--task", "sft", "--output", str(output), "--batch-size", str(batch), "--max-steps", str(args.steps),
               "--seq-len", str(args.seq), "--eval-steps", str(10 * args.steps), "--eval-examples", "8",
               "--warmup-steps", "1", "--dropout", "0", "--bf16", "--json", *extra]
    threads = "1" if nproc > 1 else "2"
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": threads})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    summary["losses"] = [line["loss"] for line in lines if "loss" in line]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="per process (one process gets twice this)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp.json"))
    args = parser.parse_args()
    cases = {"one process": (1, 2 * args.batch, []), "DDP x2": (2, args.batch, []),
             "FSDP x2": (2, args.batch, ["--fsdp"]), "FSDP x2 + QLoRA": (2, args.batch, ["--fsdp", "--qlora"]),
             "one process + QLoRA": (1, 2 * args.batch, ["--qlora"])}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, batch, extra) in cases.items():
            results[name] = run(Path(tmp) / name.replace(" ", "_"), nproc, batch, args, *extra)
            print(name, json.dumps({k: results[name][k] for k in ("train_seconds", "memory", "losses")}), flush=True)
    reference = {name: results["one process + QLoRA" if "QLoRA" in name else "one process"]["losses"] for name in results}
    rows = []
    for name, summary in results.items():
        memory = summary["memory"]
        drift = max(abs(a - b) for a, b in zip(summary["losses"], reference[name]))
        rows.append((name, f"{memory['resident_after_setup_bytes'] / 2**20:.0f}", f"{memory['peak_bytes'] / 2**20:.0f}",
                     f"{memory['estimate_bytes'] / 2**20:.0f}" if memory.get("estimate_bytes") else "-",
                     f"{summary['train_seconds'] / summary['steps']:.2f}", f"{summary['losses'][-1]:.4f}", f"{drift:.1e}"))
    print_table(f"SmolLM2-135M SFT, bf16 base, global batch {2 * args.batch} x {args.seq} tokens, {args.steps} steps",
                rows, ("run", "resident MiB after setup", "peak MiB", "estimate MiB", "s / step", "last loss",
                       "max |loss - 1 proc|"))
    for key in ("resident_after_setup_bytes", "peak_bytes"):
        fsdp, ddp = results["FSDP x2"]["memory"][key], results["DDP x2"]["memory"][key]
        print(f"FSDP / DDP {key} per process (rank 0): {fsdp / ddp:.2f} (target <= 0.6 for the frozen base)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({name: {k: s[k] for k in ("train_seconds", "steps", "memory", "losses")}
                                    for name, s in results.items()}, indent=2))


if __name__ == "__main__":
    main()
