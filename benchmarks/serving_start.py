"""A server's start with and without a kept packed-weights calibration (issue 26), side by side.

    python -m benchmarks.serving_start [--rounds 3] [--seven-b]

1. SmolLM2-135M fp32: building the engine (2 workers, --packed-weights auto) with no calibration
   kept (each start measures every weight shape, as every start did before) and with the one the
   first start kept (serving/packed_calibration.py), alternating; seconds to a ready engine, and
   how many different packing decisions the cold starts took.
2. --seven-b: LLaMA-7B's weight shapes (4096 hidden, 11008 MLP, 32000 vocab; random fp32 weights,
   about 1 GB), the calibration alone on one thread, measured against read back.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.hub.models import load_model
from lorakit.serving import Engine, packed_calibration

from .common import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seven-b", action="store_true", help="also LLaMA-7B's shapes (33 s a measurement)")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(2)
    base, tokenizer = load_model("smollm2-135m", "lm")
    with tempfile.TemporaryDirectory() as tmp:
        kept, fresh = Path(tmp) / "packed-weights.json", Path(tmp) / "fresh.json"
        files = {"measured at start": fresh, "kept": kept}  # fresh is deleted before each start
        times: dict[str, list[float]] = {case: [] for case in files}
        notes: dict[str, set[str]] = {case: set() for case in files}
        packed_calibration.calibration_file = lambda: kept
        Engine(base, tokenizer, workers=2).close()  # kernels compiled, the kept file written once
        for _ in range(args.rounds):
            for case, path in files.items():
                fresh.unlink(missing_ok=True)
                packed_calibration.calibration_file = lambda path=path: path
                start = time.perf_counter()
                engine = Engine(base, tokenizer, workers=2)
                times[case].append(time.perf_counter() - start)
                notes[case].add(engine.packed_weights_note.split("rows by weight shape: ")[-1].split(";")[0])
                engine.close()
        rows = [(case, " / ".join(f"{t:.2f}" for t in spent), f"{sorted(spent)[len(spent) // 2]:.2f}",
                 len(notes[case])) for case, spent in times.items()]
        print_table("SmolLM2-135M fp32, Engine(workers=2) until ready, seconds", rows,
                    ("calibration", "each round", "median", "distinct packing decisions"))
        cold, warm = (sorted(t)[len(t) // 2] for t in times.values())
        print(f"start with the calibration kept / measured: {warm / cold:.2f}")
        if args.seven_b:
            torch.set_num_threads(1)
            shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)]
            model = nn.Sequential(*(nn.Linear(i, o, bias=False) for i, o in shapes))
            fresh.unlink(missing_ok=True)
            packed_calibration.calibration_file = lambda: fresh
            spent = []
            for _ in range(2):
                start = time.perf_counter()
                packed_calibration.measured_steps(model)
                spent.append(time.perf_counter() - start)
            print(f"LLaMA-7B's shapes, one thread: measured {spent[0]:.1f} s, read back {spent[1]:.3f} s")


if __name__ == "__main__":
    main()
