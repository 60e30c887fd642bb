"""CLI commands that make new adapters from existing weights: combine (adapters into one) and
extract (a LoRA adapter from a full fine-tune)."""

from __future__ import annotations

import argparse
import json

from .training import list_flag


def _combine(args: argparse.Namespace) -> int:
    from ..training.combine import combine_adapters

    weights = [float(w) for w in list_flag(args.weights)] if args.weights else [1.0] * len(args.adapters)
    result = combine_adapters(args.adapters, weights, args.output, method=args.method, density=args.density,
                              majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
                              base_model=args.base, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"wrote {result['output']}: {result['method']} of {len(result['adapters'])} adapters "
          f"(weights {', '.join(f'{w:g}' for w in result['weights'])}), r={result['r']}, "
          f"{result['adapter_bytes'] / 1e6:.1f} MB")
    return 0


def add_commands(sub) -> None:
    from ..combining import COMBINATIONS

    combine = sub.add_parser(
        "combine", help="combine adapters of one base model into one (linear, cat, svd, TIES, DARE, ...)",
        description="Combine saved LoRA adapters of the same base model into one PEFT-format adapter with "
                    "PEFT's add_weighted_adapter semantics. 'linear', 'ties', 'dare_*' and 'magnitude_prune' "
                    "combine the A and B factors (equal ranks needed); 'svd' and the '*_svd' forms combine the "
                    "full updates and keep the top --svd-rank directions; 'cat' stacks them exactly.")
    combine.add_argument("adapters", nargs="+", help="adapter directories (or `lorakit train` run folders)")
    combine.add_argument("--weights", nargs="+", help="one weight per adapter, space or comma separated (default 1 each)")
    combine.add_argument("--method", default="svd", choices=COMBINATIONS, help="combination type (default svd, as PEFT)")
    combine.add_argument("--density", type=float,
                         help="share of each update's entries to keep, in (0, 1]: needed by ties, dare_* and "
                              "magnitude_prune (0.5 is a common start)")
    combine.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"],
                         help="TIES sign election: by summed values (total) or by counting signs (frequency)")
    combine.add_argument("--svd-rank", type=int, help="rank of the result for svd forms (default: the largest rank)")
    combine.add_argument("--base", help="base model, when the adapters were not written by `lorakit train`")
    combine.add_argument("--output", required=True)
    combine.add_argument("--overwrite", action="store_true")
    combine.add_argument("--json", action="store_true")
    combine.set_defaults(func=_combine)
