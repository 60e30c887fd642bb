"""The ``lorakit`` command line. Subcommands grow here; each has --help."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(output=args.output, steps=args.steps, seed=args.seed, eval_examples=args.eval_examples)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nLoRA r=8 on Q,K,V,O of MiniLM: {summary['lora_params']:,} LoRA params "
              f"({summary['trainable_params']:,} trainable incl. classifier head, "
              f"{100 * summary['trainable_params'] / summary['total_params']:.2f}% of {summary['total_params']:,})")
        print(f"trained {summary['steps']} steps in {summary['train_seconds']} s")
        print(f"test accuracy: {summary['test_accuracy']:.4f} (reloaded adapter: {summary['reloaded_accuracy']:.4f}, "
              f"merged model: {summary['merged_accuracy']:.4f}; max |logit diff| merged "
              f"{summary['max_abs_diff_merged']:.2e})")
        print(f"adapter ({summary['adapter_bytes']:,} bytes): {summary['adapter_dir']}")
        print(f"merged plain transformers model: {summary['merged_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit (PEFT-compatible).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune MiniLM on rotten-tomatoes with LoRA, evaluate, save, merge",
                          description="The embedded default job; runs offline in a few minutes on a CPU.")
    demo.add_argument("--output", default="lorakit-demo", help="directory for the log, adapter and merged model")
    demo.add_argument("--steps", type=int, default=300, help="training steps (batch 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-examples", type=int, default=None, help="evaluate on the first N test examples only")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # lorakit's errors are ValueErrors with a readable message
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
