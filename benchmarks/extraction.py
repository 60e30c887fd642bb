"""Extraction's memory: peak RSS of `lorakit extract` next to the size of the two checkpoints it reads.

    python -m benchmarks.extraction [--tuned DIR] [--rank 32]

Without --tuned, the "fine-tune" is MiniLM with every weight moved by a random rank-8 change plus
noise (a stand-in: the memory cost does not depend on how the weights were changed). The extraction
runs in a fresh process started after torch and transformers are imported; the figure is its peak
resident memory (VmHWM) minus its resident memory before the extraction (VmRSS), so the libraries'
own footprint (torch, transformers and the model's modelling code, ~140 MB for BERT) is not counted.
The largest tensor bounds the peak: a tuned and a base copy of it and their difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import torch, transformers  # imported before the baseline is read, with the model's own code
from lorakit.tools.extraction import extract
getattr(transformers, json.load(open(sys.argv[2] + "/config.json"))["architectures"][0])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
report = extract(sys.argv[1], sys.argv[2], sys.argv[3], rank=int(sys.argv[4]))
from safetensors import safe_open
with safe_open(sys.argv[2] + "/model.safetensors", "pt") as h:
    largest = max(h.get_slice(k).get_shape()[0] * (h.get_slice(k).get_shape() + [1])[1] * 4 for k in h.keys())
print(json.dumps({"rss_before": before, "peak": status("VmHWM"), "modules": len(report["modules"]),
                  "adapter_bytes": report["adapter_bytes"], "mean_retained_energy": report["mean_retained_energy"],
                  "largest_tensor": largest}))
"""


def synthetic_tuned(base: str, folder: Path) -> str:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(base)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                module.weight += 0.02 * torch.randn(out_f, 8) @ torch.randn(8, in_f) / in_f ** 0.5
                module.weight += 0.001 * torch.randn_like(module.weight)
    model.save_pretrained(folder / "tuned")
    return str(folder / "tuned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--tuned")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries
    from lorakit.hub.models import resolve_model_path

    quiet_libraries()
    base = resolve_model_path(args.base)
    with tempfile.TemporaryDirectory() as folder:
        tuned = args.tuned or synthetic_tuned(base, Path(folder))
        sizes = {name: sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
                 for name, path in (("base", base), ("tuned", tuned))}
        out = subprocess.run([sys.executable, "-c", CHILD, base, tuned, str(Path(folder) / "adapter"), str(args.rank)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    grown = result["peak"] - result["rss_before"]
    both = sizes["base"] + sizes["tuned"]
    print(f"checkpoints: base {sizes['base'] / 1e6:.1f} MB + tuned {sizes['tuned'] / 1e6:.1f} MB = {both / 1e6:.1f} MB")
    print(f"extraction at rank {args.rank}: {result['modules']} layers, adapter {result['adapter_bytes'] / 1e6:.1f} MB, "
          f"mean energy kept {result['mean_retained_energy']:.4f}")
    print(f"peak RSS growth during extraction: {grown / 1e6:.1f} MB = {grown / both:.2f}x the two checkpoints; "
          f"largest tensor {result['largest_tensor'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
