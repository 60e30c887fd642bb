"""What a mixed-adapter batch adds to one decoding step of the whole model, against the base model's
step, side by side in one run (issue 26).

    python -m benchmarks.mixed_step [--rows 4,8 --adapters 8 --threads 1]
    python -m benchmarks.mixed_step --lorakit /path/to/other/checkout   # the same on another commit

SmolLM2-135M (fp32), ``--adapters`` PEFT adapters (r=8 on q,k,v,o, random B) loaded into one copy;
a 200-token prompt per row is prefilled once, then one-token decoding steps are timed (median of 20,
best of 3 rounds, base and mixed alternating): the base model's plain step, and the same step inside
``lk.mixed_batch`` with row i on adapter i and ``stack=`` every loaded adapter (what the server does at
every step). Also timed: entering and leaving the block alone, and the first block after an adapter
swap (one adapter deleted, another loaded), which builds every layer's stacks again. With --lorakit
the package is imported from that checkout, so two commits compare on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

from .common import parse_with_checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="4,8", help="decoding rows, comma separated")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a serving worker has 1)")
    args = parse_with_checkout(parser)
    import torch
    from transformers import DynamicCache

    import lorakit as lk
    from lorakit.hub.models import load_model

    from .serving_load import make_adapters

    torch.set_num_threads(args.threads)
    base, _ = load_model("smollm2-135m", "lm")
    base.eval()
    directory = Path(tempfile.mkdtemp())
    names = make_adapters(base, directory, args.adapters + 1)  # one spare for the swap
    model = copy.deepcopy(base)
    for name in names[:-1]:
        lk.load_adapter(model, directory / name, adapter_name=name)
    print(f"lorakit from {Path(lk.__file__).parent}; {args.threads} thread(s), {args.adapters} adapters")

    def step_ms(net, block, rows: int) -> float:
        """Median time of a one-token step over a 200-token cache, ``block()`` entered around each."""
        with torch.no_grad():
            cache = DynamicCache()
            with block():
                net(torch.randint(0, 40000, (rows, 200)), cache=cache, use_cache=True, logits_to_keep=1)
            token = torch.randint(0, 40000, (rows, 1))
            times = []
            for _ in range(20):
                start = time.perf_counter()
                with block():
                    net(token, cache=cache, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - start)
                cache.crop(-1)
        return statistics.median(times) * 1e3

    for rows in [int(r) for r in args.rows.split(",")]:
        loaded = lk.list_adapters(model)
        row_names = [loaded[i % len(loaded)] for i in range(rows)]
        mixed = functools.partial(lk.mixed_batch, model, row_names, stack=loaded)
        base_best, mixed_best = float("inf"), float("inf")
        for _ in range(3):
            base_best = min(base_best, step_ms(base, contextlib.nullcontext, rows))
            mixed_best = min(mixed_best, step_ms(model, mixed, rows))
        print(f"{rows} rows: base step {base_best:.1f} ms, mixed step {mixed_best:.1f} ms, "
              f"overhead {mixed_best - base_best:.1f} ms ({mixed_best / base_best:.2f}x)")

    def enter_ms() -> float:
        loaded = lk.list_adapters(model)
        start = time.perf_counter()
        with lk.mixed_batch(model, loaded[:4], stack=loaded):
            pass
        return (time.perf_counter() - start) * 1e3
    with torch.no_grad():
        enter_ms()
        kept = min(statistics.median(enter_ms() for _ in range(50)) for _ in range(3))
        rebuilt = []
        spare = names[-1]
        for _ in range(5):
            victim = lk.list_adapters(model)[0]
            lk.delete_adapter(model, victim)
            lk.load_adapter(model, directory / spare, adapter_name=spare)
            rebuilt.append(enter_ms())
            spare = victim
    print(f"entering and leaving the block: {kept:.2f} ms; the first block after a swap: "
          f"{statistics.median(rebuilt):.1f} ms")


if __name__ == "__main__":
    main()
