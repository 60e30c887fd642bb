"""Adapter analysis on real adapters: subspace similarity of r=8 vs r=64, and r=64 -> r=8 compression.

    lorakit demo --r 8 --output runs/r8 && lorakit demo --r 64 --output runs/r64
    python -m benchmarks.adapter_analysis runs/r8/adapter runs/r64/adapter --out runs/analysis

Both adapters: MiniLM + rotten-tomatoes (split by movie), LoRA on Q,K,V,O, trained by the CLI.
Reports the phi grid summary, writes heatmaps, compresses r=64 to r=8 and evaluates all three
adapters on the same test set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lorakit as lk
from lorakit.hub.models import load_model
from lorakit.tools import analysis
from lorakit.tools.plots import similarity_heatmaps
from lorakit.training.data import encode, load_splits
from lorakit.training.evaluation import evaluate

from .common import print_table

LABELS = ["negative", "positive"]


def test_accuracy(adapter: Path, test) -> float:
    model, tokenizer = load_model("minilm", "classify", LABELS)
    lk.load_adapter(model, adapter)
    examples = encode(test, tokenizer, "classify", 64, "test", labels=LABELS)
    return evaluate(model, examples, "classify", tokenizer.pad_token_id, LABELS)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("small", type=Path, help="the r=8 adapter")
    parser.add_argument("large", type=Path, help="the r=64 adapter")
    parser.add_argument("--out", type=Path, default=Path("bench-out/analysis"))
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)

    grids = analysis.compare(args.small, args.large)
    plots = similarity_heatmaps(grids, args.out, labels=(f"{args.small}", f"{args.large}"))
    by_kind: dict[str, list[torch.Tensor]] = {}
    for path, grid in grids.items():
        by_kind.setdefault(path.rsplit(".", 1)[-1], []).append(grid)
    rows = []
    for kind, kind_grids in sorted(by_kind.items()):
        mean = torch.stack(kind_grids).mean(0)
        rows.append((kind, len(kind_grids), f"{mean[0, 0]:.3f}", f"{mean[0, 7]:.3f}", f"{mean[7, 7]:.3f}",
                     f"{mean[7, 63]:.3f}"))
    print_table(f"phi(i, j), {args.small} (r=8) vs {args.large} (r=64), mean over layers", rows,
                ("module", "layers", "phi(1,1)", "phi(1,8)", "phi(8,8)", "phi(8,64)"))

    compressed = args.out / f"r64_to_r{args.rank}"
    result = analysis.compress(args.large, compressed, rank=args.rank)
    test = load_splits("rotten-tomatoes")["test"]
    accs = {name: test_accuracy(path, test) for name, path in
            [("r=8 trained", args.small), ("r=64 trained", args.large), (f"r=64 compressed to r={args.rank}", compressed)]}
    print_table(f"rotten-tomatoes test accuracy ({len(test)} reviews)",
                [(k, f"{v:.4f}") for k, v in accs.items()], ("adapter", "accuracy"))
    print(f"compression: max relative error {result['max_relative_error']:.4f}; {result['recommendation']['text']}")
    print("heatmaps:", ", ".join(str(p) for p in plots))
    (args.out / "summary.json").write_text(json.dumps({"accuracy": accs, "phi": rows,
                                                       "compression": result}, indent=2, default=str))


if __name__ == "__main__":
    main()
