"""CLI commands that make new adapters from existing weights: combine (adapters into one) and
extract (a LoRA adapter from a full fine-tune)."""

from __future__ import annotations

import argparse
import json

from .output import answer
from .training import list_flag


def _combine(args: argparse.Namespace) -> int:
    from ..tools.combine import combine_adapters

    weights = [float(w) for w in list_flag(args.weights)] if args.weights else [1.0] * len(args.adapters)
    result = combine_adapters(args.adapters, weights, args.output, method=args.method, density=args.density,
                              majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
                              base_model=args.base, overwrite=args.overwrite)
    return answer(args, result, lambda r: [
        f"wrote {r['output']}: {r['method']} of {len(r['adapters'])} adapters (weights "
        f"{', '.join(f'{w:g}' for w in r['weights'])}), r={r['r']}, {r['adapter_bytes'] / 1e6:.1f} MB"])


def _extract(args: argparse.Namespace) -> int:
    from ..hub.models import resolve_model_path
    from ..io.runs import RUN_FILE, read_run
    from ..tools.extraction import extract

    tuned = args.tuned
    extra = {}
    try:  # a `lorakit train --full` run: the adapter gets a run record, so eval / merge / serve work on it
        tuned_dir, record = read_run(args.tuned)
        tuned = str(tuned_dir)
        extra[RUN_FILE] = json.dumps({**record, "full": False, "extracted_from": tuned}, indent=2) + "\n"
    except ValueError:
        pass
    report = extract(resolve_model_path(args.base), resolve_model_path(tuned), args.output, rank=args.rank,
                     energy=args.energy, keep_changed=args.keep_changed, extra_files=extra)
    if args.plot:
        from ..tools.plots import extraction_plot

        report["plot"] = str(extraction_plot(report, args.plot))
    def human(report):
        for row in report["modules"]:
            yield (f"  {row['module']:<60} r {row['rank']:>4}  energy kept {row['retained_energy']:.4f}  "
                   f"relative error {row['relative_error']:.4f}")
        if report["changed_not_linear"]:
            what = "stored" if args.keep_changed else "NOT stored (pass --keep-changed to store them)"
            yield f"{len(report['changed_not_linear'])} other tensors changed (norms, embeddings, biases): {what}"
        if report["new_in_tuned"]:
            yield f"stored as modules_to_save (only the tuned model has them): {', '.join(report['stored_modules_to_save'])}"
        others = f" ({len(report['rank_pattern'])} layers with other ranks)" if report["rank_pattern"] else ""
        yield (f"wrote {report['output']}: r={report['r']}{others}, {report['adapter_bytes'] / 1e6:.1f} MB; energy "
               f"kept: mean {report['mean_retained_energy']:.4f}, min {report['min_retained_energy']:.4f}")
        if report.get("plot"):
            yield f"plot: {report['plot']}"

    return answer(args, report, human)


def add_commands(sub) -> None:
    from ..model.combining import COMBINATIONS

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

    extract = sub.add_parser(
        "extract", help="a LoRA adapter from a full fine-tune (truncated SVD of W_tuned - W_base per layer)",
        description="Per linear layer, the truncated SVD of W_tuned - W_base becomes a PEFT-format LoRA pair. Both "
                    "checkpoints are read tensor by tensor from safetensors, so memory stays near one layer's worth.")
    extract.add_argument("--base", required=True, help="the base model (directory or embedded name)")
    extract.add_argument("--tuned", required=True, help="the fully fine-tuned model (directory or `lorakit train --full` run)")
    size = extract.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the same rank K in every layer")
    size.add_argument("--energy", type=float,
                      help="per layer, the smallest rank keeping this share of ||dW||^2 (e.g. 0.9); ranks go to rank_pattern")
    extract.add_argument("--keep-changed", action="store_true",
                         help="also store changed norms, embeddings (modules_to_save) and biases (bias=lora_only)")
    extract.add_argument("--output", required=True)
    extract.add_argument("--plot", metavar="DIR", help="write extraction.png (energy kept and rank per layer) to DIR")
    extract.add_argument("--json", action="store_true")
    extract.set_defaults(func=_extract)
