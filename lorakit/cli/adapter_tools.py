"""CLI commands that work on adapters and model shapes: estimate, analyze, compress."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .output import answer


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


TASK_NOTES = {"dpo": ", --task dpo: 2 sequences per pair", "orpo": ", --task orpo: 2 sequences per pair",
              "kto": ", --task kto: each row with its KL completion", "grpo": ", --task grpo: {g} completions per prompt "
              "+ their rollout KV cache"}


def _estimate(args: argparse.Namespace) -> int:
    from ..tools import estimate as est
    from .training import list_flag

    targets = list_flag(args.targets)
    if targets and len(targets) == 1 and (targets[0] == "all-linear" or set(targets[0]) & set("*+?|()[]{}^$\\")):
        targets = targets[0]  # "all-linear" or a regex, as LoraConfig takes them
    if args.linear:
        out_dim, in_dim = (int(v) for v in args.linear.lower().split("x"))
        lora, base, pct = est.single_projection(out_dim, in_dim, args.r)
        result = {"projection": args.linear, "r": args.r, "lora_params": lora, "base_params": base, "percent": pct}
        return answer(args, result, lambda r: [
            f"{r['projection']} projection, r={r['r']}: {r['lora_params']:,} LoRA params vs {r['base_params']:,} "
            f"({r['percent']:.2f}%, {r['base_params'] / r['lora_params']:.0f}x fewer)"])
    config = est.load_config(args.preset, args.config, args.model)
    result = est.estimate(config, r=args.r, targets=targets, lora_alpha=args.alpha, dtype=args.dtype,
                          optimizer=args.optimizer, batch_size=args.batch_size, seq_len=args.seq_len,
                          grad_checkpointing=args.grad_checkpointing, name=args.preset or args.config or args.model,
                          use_dora=args.use_dora, chunked_loss=args.chunked_loss, nproc=args.nproc, fsdp=args.fsdp,
                          task=args.task, num_generations=args.num_generations)

    def human(_):
        yield f"{result.model}: {result.model_params:,} parameters; LoRA r={args.r}"
        for target, count in result.per_target.items():
            yield f"  {target:<24} {count:>14,}"
        yield (f"  {'total':<24} {result.lora_params:>14,}  ({result.percent:.3f}% of all parameters; "
               f"{result.per_layer:,} per layer)")
        yield f"adapter file: {_gb(result.adapter_bytes_fp32)} in fp32, {_gb(result.adapter_bytes_fp16)} in fp16"
        processes = (f", per process of {args.nproc}" + (" (FSDP)" if args.fsdp else " (DDP)")) if args.nproc > 1 else ""
        yield (f"\nmemory ({args.dtype} weights, {args.optimizer}, batch {args.batch_size} x {args.seq_len}"
               f"{', gradient checkpointing' if args.grad_checkpointing else ''}"
               f"{TASK_NOTES.get(args.task, '').format(g=args.num_generations)}{processes}):")
        yield f"  {'method':<8}{'weights':>12}{'gradients':>12}{'optimizer':>12}{'activations':>13}{'total':>12}"
        planned = "qlora" if args.qlora else "lora"
        for row in result.memory:
            mark = "*" if row.method == planned else " "
            yield (f" {mark}{row.method:<8}{_gb(row.weights):>12}{_gb(row.gradients):>12}{_gb(row.optimizer):>12}"
                   f"{_gb(row.activations):>13}{_gb(row.total):>12}")

    return answer(args, result.to_dict(), human)


def _analyze(args: argparse.Namespace) -> int:
    from ..tools import analysis

    if args.compare:
        grids = analysis.compare(args.adapter, args.compare)
        plots = []
        if args.plot:
            from ..tools.plots import similarity_heatmaps

            plots = [str(p) for p in similarity_heatmaps(grids, args.plot, labels=(args.adapter, args.compare))]

        def human_compare(_):
            yield (f"subspace similarity phi(i, j) of {args.adapter} vs {args.compare} "
                   f"(right-singular vectors of A; 1 = same directions)")
            for path, grid in grids.items():
                k = min(grid.shape)
                yield (f"  {path}: phi(1,1)={grid[0, 0]:.3f}  phi(1,{grid.shape[1]})={grid[0, -1]:.3f}  "
                       f"phi({k},{k})={grid[k - 1, k - 1]:.3f}")
            for p in plots:
                yield f"plot: {p}"

        phi = {path: grid.tolist() for path, grid in grids.items()}
        return answer(args, {"phi": phi, "plots": plots}, human_compare)
    report = analysis.analyze(args.adapter)
    if args.plot:
        from ..tools.plots import spectrum_plots

        report["plots"] = [str(p) for p in spectrum_plots(report, args.plot)]

    def human(report):
        yield f"{args.adapter}: r={report['r']}, lora_alpha={report['lora_alpha']}, base {report['base_model']}"
        yield f"  {'module':<60}{'norm':>10}{'rank90':>8}{'rank99':>8}  top singular values"
        for row in report["modules"]:
            top = ", ".join(f"{v:.3g}" for v in row["singular_values"][:3])
            yield (f"  {row['path']:<60}{row['norm']:>10.4f}{row['effective_rank_90']:>8}"
                   f"{row['effective_rank_99']:>8}  {top}")
        for kind, summary in report["summary"].items():
            yield (f"  {kind}: {summary['modules']} modules, mean norm {summary['mean_norm']:.4f}, mean effective "
                   f"rank {summary['mean_effective_rank_90']:.1f} (90%) / {summary['mean_effective_rank_99']:.1f} (99%)")
        yield report["recommendation"]["text"]
        for p in report.get("plots", []):
            yield f"plot: {p}"

    return answer(args, report, human)


def _compress(args: argparse.Namespace) -> int:
    from ..tools import analysis

    result = analysis.compress(args.adapter, args.output, rank=args.rank, energy=args.energy)

    def human(result):
        for row in result["modules"]:
            yield (f"  {row['module']:<60} r {row['rank']:>3} -> {row['new_rank']:>3}  "
                   f"relative error {row['relative_error']:.4f}")
        yield f"wrote {result['output']} (r={result['new_rank']}); max relative error {result['max_relative_error']:.4f}"
        yield result["recommendation"]["text"]

    return answer(args, result, human)


def _export(args: argparse.Namespace) -> int:
    from ..hub.models import resolve_model_path

    if args.format == "vllm":
        from ..io.vllm_export import export_vllm

        result = export_vllm(args.adapter, args.output, resolve_model_path(args.base) if args.base else None,
                             rank=args.rank, tolerance=args.tolerance)

        def human(result):
            how = "exact" if result["exact"] else (f"DoRA cut by SVD, max relative spectral error "
                                                    f"{result['max_relative_spectral_error']:.2e}")
            yield (f"wrote {result['output']}: plain LoRA r={result['r']} alpha={result['lora_alpha']} on "
                   f"{result['modules']} modules from a {result['source']} adapter ({how})")
            if result["hint"]:
                yield "note: " + result["hint"]
            yield "vLLM: vllm serve BASE --enable-lora --lora-modules NAME=" + result["output"] + \
                f" --max-lora-rank {result['r']}"

        return answer(args, result, human)
    from ..io.gguf import export_gguf

    if not args.base:
        raise ConfigError("--format gguf needs --base (the base model's directory or embedded name: its config)")
    result = export_gguf(args.adapter, resolve_model_path(args.base), args.output, args.outtype)
    return answer(args, result, lambda r: [
        f"wrote {r['output']}: {r['tensors']} tensors for {r['architecture']}, alpha {r['alpha']:g}, "
        f"{r['bytes'] / 1e6:.1f} MB (llama.cpp: llama-server -m BASE.gguf --lora FILE)"])


def add_commands(sub) -> None:
    estimate = sub.add_parser("estimate", help="LoRA parameter counts and training memory, from a config alone",
                              description="Counts are exact (model built on the meta device, no weights).")
    source = estimate.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a transformers config.json (or its directory)")
    source.add_argument("--model", help="a model directory (only its config.json is read)")
    source.add_argument("--preset", help="bert-base-uncased, roberta-base, llama-7b, llama-3.1-8b, gpt3-175b, "
                                         "minilm, smollm2-135m")
    source.add_argument("--linear", metavar="OUTxIN", help="a single projection, e.g. 4096x4096")
    estimate.add_argument("--r", type=int, default=8)
    estimate.add_argument("--alpha", type=float, default=None)
    estimate.add_argument("--targets", nargs="+", default=None,
                          help="module names/suffixes, a regex, or all-linear (default: attention q,k,v,o)")
    estimate.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    estimate.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    estimate.add_argument("--batch-size", type=int, default=1)
    estimate.add_argument("--seq-len", type=int, default=512)
    estimate.add_argument("--grad-checkpointing", action="store_true")
    estimate.add_argument("--qlora", action="store_true",
                          help="plan QLoRA (NF4 base, 4.127 bits/weight): marks that row of the memory table")
    estimate.add_argument("--use-dora", action="store_true",
                          help="count DoRA's magnitude vectors (one value per output feature of each adapted layer)")
    estimate.add_argument("--chunked-loss", action="store_true",
                          help="the output head and cross-entropy a chunk of tokens at a time, as `lorakit train` "
                               "runs causal LMs (default: transformers' full logits)")
    estimate.add_argument("--nproc", type=int, default=1,
                          help="processes (torchrun --nproc_per_node); memory is per process, --batch-size too")
    estimate.add_argument("--fsdp", action="store_true",
                          help="FSDP shards weights, gradients and optimizer states across --nproc processes")
    estimate.add_argument("--task", default="sft", choices=["sft", "lm", "dpo", "orpo", "kto", "grpo"],
                          help="what a preference / RL run adds: dpo, orpo, kto train on two sequences per example "
                               "(--batch-size pairs); grpo on --num-generations completions per prompt (--batch-size "
                               "prompts) and keeps their rollout KV cache")
    estimate.add_argument("--num-generations", type=int, default=8,
                          help="grpo: completions per prompt (each of up to --seq-len tokens, prompt included)")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=_estimate)

    analyze = sub.add_parser("analyze", help="spectra and effective rank of an adapter; --compare for subspace similarity")
    analyze.add_argument("adapter", help="adapter directory (PEFT format)")
    analyze.add_argument("--compare", metavar="OTHER", help="a second adapter on the same base model")
    analyze.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR")
    analyze.add_argument("--json", action="store_true")
    analyze.set_defaults(func=_analyze)

    compress = sub.add_parser("compress", help="SVD-truncate an adapter to a lower rank (PEFT-compatible output)")
    compress.add_argument("adapter")
    how = compress.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="keep K singular directions in every module")
    how.add_argument("--energy", type=float, help="keep this share of each module's update energy, e.g. 0.99")
    compress.add_argument("--output", required=True)
    compress.add_argument("--json", action="store_true")
    compress.set_defaults(func=_compress)

    export = sub.add_parser("export", help="an adapter as llama.cpp's LoRA GGUF (llama-server --lora, Ollama ADAPTER), "
                                           "or as the plain LoRA vLLM serves (--format vllm)")
    export.add_argument("adapter", help="adapter directory (PEFT format)")
    export.add_argument("--format", default="gguf", choices=["gguf", "vllm"],
                        help="gguf: llama.cpp's adapter file; vllm: a plain LoRA directory (one rank and alpha, "
                             "lora_A/lora_B only) for any lorakit adapter: rank/alpha patterns and AdaLoRA exactly, "
                             "DoRA by a truncated SVD of its merged update (its error reported); adapters with modules "
                             "trained in full are refused (merge them)")
    export.add_argument("--base", help="the base model (directory or embedded name): gguf reads its config, vllm "
                                       "its weights (DoRA only)")
    export.add_argument("--output", required=True, help="the .gguf file (gguf) or the directory (vllm) to write")
    export.add_argument("--rank", type=int, help="vllm, DoRA: the SVD rank (default: the smallest that keeps every "
                                                 "dropped singular value ≤ --tolerance × the largest)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="vllm, DoRA: the relative spectral error allowed per module (default 1e-3)")
    export.add_argument("--outtype", default="f32", choices=["f32", "f16"])
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_export)
