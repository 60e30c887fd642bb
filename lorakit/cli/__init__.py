"""The ``lorakit`` command line: one sub-command per job, each with --help."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import adapter_algebra, adapter_tools, serving, training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit (PEFT-compatible).")
    sub = parser.add_subparsers(dest="command", required=True)
    training.add_commands(sub)
    adapter_tools.add_commands(sub)
    adapter_algebra.add_commands(sub)
    serving.add_commands(sub)
    return parser


def quiet_libraries() -> None:
    """Keep library chatter a user cannot act on (weight-loading reports and bars, optional-kernel
    notices) out of the output; lorakit says what matters in its own words."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("bitsandbytes", "torchao", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    # the CLI's warnings are messages for the user (e.g. truncated rows), not for a developer's traceback
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    try:
        return args.func(args)
    except ValueError as exc:  # lorakit's errors are ValueErrors with a readable message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a full disk met outside lorakit's staged writes (a log line)
        from ..io.atomic import write_failure

        message = write_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
