"""LoRA extraction from a real full fine-tune: MiniLM on rotten-tomatoes, then `lorakit extract`.

    python -m benchmarks.extraction_study [--steps 300] [--out benchmarks/results/extraction_study.jsonl]

1. `lorakit train --full` (the classify defaults for --full: lr 5e-5, batch 32; 64-token reviews).
2. `lorakit extract --rank 8 / 32 / 64` and `--energy 0.9` (the new head always travels as
   modules_to_save), plus r=32 with --keep-changed (norms, embeddings, biases stored too).
3. `lorakit eval` of every adapter on the 1,285 test reviews, next to the full fine-tune; adapter
   size; peak memory of each extraction (a fresh process, see benchmarks/extraction.py) next to the
   two checkpoints' size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .extraction import CHILD

KEEP = "--keep-changed"


def cli_json(*argv) -> dict:
    out = subprocess.run([sys.executable, "-m", "lorakit", *map(str, argv), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    text = out.stdout
    return json.loads(text[text.index("{"):])


def peak_growth(base: str, tuned: str, folder: Path, rank: int) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, base, tuned, str(folder / f"mem-{rank}"), str(rank)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak"] - result["rss_before"], result["largest_tensor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/extraction_study.jsonl")
    parser.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    from lorakit.hub.models import resolve_model_path

    base = str(resolve_model_path("minilm"))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        full = work / "full"
        summary = cli_json("train", "--model", "minilm", "--data", "rotten-tomatoes", "--full", "--max-steps",
                           args.steps, "--seq-len", 64, "--output", full, "--overwrite")
        rows = [{"adapter": "full fine-tune", "test_accuracy": round(summary["test"]["accuracy"], 4),
                 "bytes": sum(f.stat().st_size for f in (full / "model").glob("*.safetensors"))}]
        sizes = sum(f.stat().st_size for f in (full / "model").glob("*.safetensors")) + \
            sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
        for how in (["--rank", 8], ["--rank", 32], ["--rank", 64], ["--energy", 0.9], ["--rank", 32, KEEP]):
            label = " ".join(map(str, how))
            target = work / label.replace(" ", "").replace("-", "")
            report = cli_json("extract", "--base", "minilm", "--tuned", full, *how, "--output", target)
            metrics = cli_json("eval", target)
            row = {"adapter": label, "test_accuracy": round(metrics["accuracy"], 4), "bytes": report["adapter_bytes"],
                   "r": report["r"], "rank_pattern_layers": len(report["rank_pattern"]),
                   "mean_retained_energy": report["mean_retained_energy"],
                   "max_relative_error": report["max_relative_error"],
                   "changed_other_tensors": len(report["changed_not_linear"])}
            if how[0] == "--rank" and KEEP not in how:
                grown, largest = peak_growth(base, str(full / "model"), work, how[1])
                row.update(peak_rss_growth=grown, checkpoints_bytes=sizes, largest_tensor=largest)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| adapter | test accuracy | size | mean energy kept | max rel. error | peak RSS growth |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_rss_growth'] / 1e6:.0f} MB ({r['peak_rss_growth'] / r['checkpoints_bytes']:.2f}x both)" \
            if "peak_rss_growth" in r else "–"
        print(f"| {r['adapter']} | {r['test_accuracy']:.4f} | {r['bytes'] / 1e6:.1f} MB | "
              f"{r.get('mean_retained_energy', '–')} | {r.get('max_relative_error', '–')} | {peak} |")


if __name__ == "__main__":
    main()
