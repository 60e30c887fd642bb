"""CLI commands around training: train, eval, predict, generate, merge, sweep, demo."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..training.options import DEFAULTS_WHY
from .output import answer

# flags that map onto TrainOptions fields; every default is None so a YAML value is not overridden
TRAIN_FLAGS = [
    ("--model", str, "embedded name (minilm, smollm2-135m), a model directory or a .gguf file"),
    ("--task", str, "classify | sft | lm, or preference / RL: dpo | orpo | kto | grpo (data layouts, as TRL's: "
                    "prompt/chosen/rejected or chosen/rejected for dpo and orpo, prompt/completion/label for kto, "
                    "prompt plus the columns rewards read for grpo; text or chat conversations)"),
    ("--output", str, "run directory (log, checkpoint, adapter, loss curve)"),
    ("--r", int, "LoRA rank"), ("--alpha", float, "lora_alpha (default 2*r)"), ("--dropout", float, "lora_dropout"),
    ("--epochs", float, "passes over the train split (default 1)"),
    ("--max-steps", int, "optimizer steps (overrides --epochs and --min-steps)"),
    ("--min-steps", int, "train at least this many steps, repeating small data (default: classify 150, sft/lm "
                         "100: a new head and adapter need ~100+ updates; the best validation checkpoint is kept)"),
    ("--lr", float, "peak learning rate, linear warm-up and decay (default: classify 2e-3, sft 1e-3, lm 5e-4, "
                    "--full 5e-5; chosen by the defaults study in BENCHMARKS.md)"), ("--warmup-steps", int, None),
    ("--weight-decay", float, None),
    ("--batch-size", int, "examples per step per process (default: classify 32, sft/lm 8)"), ("--grad-accum", int, "micro-batches per step"),
    ("--seq-len", int, "tokens per example (longer rows are truncated with a warning)"),
    ("--seed", int, None), ("--eval-steps", int, "evaluate on validation every N steps (default: each epoch)"),
    ("--eval-examples", int, "use only the first N validation/test examples"),
    ("--early-stopping-patience", int, "stop after N evaluations without improvement of the validation metric "
                                       "(classify: accuracy; others: loss or the objective's score); the best "
                                       "checkpoint is kept"),
    ("--neftune-noise-alpha", float, "NEFTune: uniform noise of scale ALPHA/sqrt(seq_len*hidden) on the input "
                                     "embeddings while training, as transformers' Trainer (the paper uses 5)"),
    ("--save-steps", int, "write a resumable checkpoint every N steps"),
    ("--init", str, "adapter initialisation: gaussian, pissa, pissa_niter_K (randomised SVD, K iterations), "
                    "olora (default: Kaiming A, zero B; pissa/olora runs save an adapter for the original base), or "
                    "loftq with --qlora (A, B start as the best rank-r fit of the 4-bit error W - NF4(W); "
                    "--alpha then defaults to r)"),
    ("--loraplus-ratio", float, "LoRA+: B learns RATIO times faster than A (the paper uses 16)"),
    ("--optim", str, "optimizer: adamw (default), adamw8bit (bitsandbytes, 8-bit moments), sgd (momentum 0.9), "
                      "adafactor"),
    ("--lr-scheduler", str, "linear (default), cosine, constant or constant_with_warmup"),
    ("--warmup-ratio", float, "warmup as a share of the run's steps (instead of --warmup-steps)"),
    ("--head-lr", float, "learning rate of modules trained in full beside the adapters (the classifier head)"),
    ("--report-to", str, "experiment trackers, commas or spaces between: tensorboard (OUTPUT/tensorboard), mlflow "
                         "(MLFLOW_TRACKING_URI, else OUTPUT/mlruns), wandb (offline in OUTPUT/wandb unless WANDB_MODE "
                         "is set), all, none; each an extra: pip install 'lorakit[mlflow]'"),
    ("--method", str, "lora (default) or adalora: SVD-form adapters whose ranks AdaLoRA's allocator prunes"),
    ("--init-r", int, "adalora: triplets per layer at the start (default 12, as PEFT)"),
    ("--target-r", int, "adalora: average triplets per layer at the end (default 8, as PEFT)"),
    ("--tinit", int, "adalora: steps before pruning starts (default 10%% of the run)"),
    ("--tfinal", int, "adalora: steps of final training at fixed ranks (default 20%% of the run)"),
    ("--delta-t", int, "adalora: re-allocate ranks every N steps (default 1)"),
    ("--text-column", str, None), ("--label-column", str, None),
    ("--prompt-template", str, "sft: format a row into the user turn, e.g. 'Review: {text}'"),
    ("--response-template", str, "sft: format the answer, e.g. '{label}'"),
    ("--log-every", int, None),
    ("--adapter", str, "dpo/orpo/kto/grpo: start from this trained adapter (e.g. an SFT run's adapter/); a frozen "
                       "copy of it is the reference policy (without it: a new adapter, the base is the reference)"),
    ("--beta", float, "dpo/orpo/kto/grpo: strength of the reference (KL) term (TRL's defaults: 0.1; grpo 0.0, "
                      "which runs no reference pass)"),
    ("--label-smoothing", float, "dpo --loss robust / simpo: probability that a preference is flipped"),
    ("--simpo-gamma", float, "dpo --loss simpo: target reward margin (default 0.5)"),
    ("--cpo-alpha", float, "dpo --loss simpo: weight of the chosen NLL (default 0: SimPO; TRL's CPO uses 1.0)"),
    ("--desirable-weight", float, "kto: weight of desirable completions"),
    ("--undesirable-weight", float, "kto: weight of undesirable completions"),
    ("--num-generations", int, "grpo: completions per prompt, G (default 8); --batch-size counts prompts, so a "
                               "micro-batch holds batch x G completions (TRL's per_device_train_batch_size)"),
    ("--max-completion-length", int, "grpo: tokens per sampled completion (default 64)"),
    ("--temperature", float, "grpo: sampling temperature (default 1.0)"), ("--top-p", float, "grpo: nucleus sampling"),
    ("--num-iterations", int, "grpo: optimizer steps per generation (the clipped ratio's mu; default 1)"),
    ("--epsilon", float, "grpo: clip range of the ratio (default 0.2)"),
    ("--epsilon-high", float, "grpo: upper clip (default: --epsilon)"),
    ("--scale-rewards", str, "grpo: divide advantages by the group's (group), batch's (batch) or no (none) std"),
    ("--answer-column", str, "grpo answer_match reward: the column with the right answer (default answer, or label)"),
    ("--answer-pattern", str, "grpo answer_match reward: regex whose first group is the answer (default: first word)"),
    ("--format-pattern", str, "grpo format reward: regex the whole completion must match"),
    ("--max-grad-norm", float, "clip the gradients' global norm to this (default 1.0; 0 turns clipping off)"),
]
TRAIN_SWITCHES = [("--use-dora", "DoRA: learn a magnitude per output feature besides the low-rank direction"),
                  ("--rslora", "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r"),
                  ("--grad-checkpointing", "recompute activations in backward: less memory, more time"),
                  ("--compile", "torch.compile the model for training (a compile pause first, then faster steps)"),
                  ("--fsdp", "under torchrun: shard the frozen base and the adapters across processes (FSDP2) "
                             "instead of copying the model into each (DDP)"),
                  ("--packing", "lm / sft: several examples per row (no attention across them): fewer padded tokens"),
                  ("--bf16", "frozen base in bf16 + autocast; LoRA weights stay fp32"),
                  ("--qlora", "frozen base quantized to 4-bit NF4"), ("--full", "full fine-tuning, for comparison"),
                  ("--resume", "continue the run in --output from its checkpoint"),
                  ("--precompute-ref", "dpo/kto: compute the reference log-probabilities once before training "
                                       "instead of a no-grad forward each step"),
                  ("--overwrite", "replace a previous run in --output")]


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file of options (flags override it)")
    for flag, kind, text in TRAIN_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--data", nargs="+", default=None,
                        help="embedded name (rotten-tomatoes, bbc-news, hamlet), a CSV/JSONL/parquet/text file, a "
                             "directory with train.*/validation.*/test.* files, or a mixture of them with weights: "
                             "a.jsonl:0.7 b.jsonl:0.3 (the train split drawn in those proportions, its size the sum "
                             "of the parts'; validation and test are the parts' own, together)")
    parser.add_argument("--targets", nargs="+", default=None,
                        help="modules to adapt, separated by spaces or commas: names/suffixes, a regex, or all-linear "
                             "(default all-linear: every linear layer but the output head, which learned on every "
                             "corpus of the defaults study where q/v alone did not)")
    parser.add_argument("--modules-to-save", nargs="+", default=None,
                        help="modules trained in full besides the adapters (classify always adds its head)")
    parser.add_argument("--add-tokens", nargs="+", default=None, metavar="TOKEN",
                        help="sft / lm: new tokens (commas or spaces between), added to the tokenizer; the embedding "
                             "is resized and only the new rows train besides the adapter (PEFT's "
                             "trainable_token_indices), and the untied output head's rows too")
    parser.add_argument("--trainable-tokens", nargs="+", default=None, metavar="TOKEN",
                        help="sft / lm: existing tokens whose embedding rows train besides the adapter, as ids or as "
                             "the vocabulary spells them, e.g. '<|im_start|>,<|im_end|>'")
    for flag, text in TRAIN_SWITCHES:
        parser.add_argument(flag, action="store_true", default=None, help=text)
    parser.add_argument("--loss", dest="loss_type", default=None,
                        help="dpo: sigmoid (default), ipo, hinge, robust, or simpo (reference-free, TRL's CPO); grpo: "
                             "dapo (default, TRL's), grpo, bnpo, dr_grpo")
    parser.add_argument("--reward", dest="rewards", action="append", default=None,
                        help="grpo, repeatable: NAME or NAME=WEIGHT, NAME a built-in (answer_match: the extracted answer "
                             "equals --answer-column; format: matches --format-pattern; length: a length penalty) or "
                             "module:function / file.py:function called as TRL calls reward functions (prompts=, "
                             "completions=, completion_ids=, and every other column as keyword arguments); default "
                             "answer_match")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


REGEX_CHARS = set("*+?|()[]{}^$\\")


def _is_regex(value: str) -> bool:
    return bool(set(value) & REGEX_CHARS)


def list_flag(values: list[str] | None) -> list[str] | None:
    """A list-valued flag as users type it: spaces or commas (``--targets q_proj,v_proj``, as in
    LLaMA-Factory); a regex is kept whole."""
    if values is None:
        return None
    items = []
    for value in values:
        items += [value] if _is_regex(value) else [v.strip() for v in value.split(",") if v.strip()]
    return items


def token_list(values: list[str] | None) -> list[str] | None:
    """Tokens as users type them, split on commas and spaces only (tokens such as <|im_end|> hold
    characters that list_flag would take for a regex)."""
    if values is None:
        return None
    return [t for value in values for t in value.replace(",", " ").split()]


def options_from(args: argparse.Namespace):
    from ..training.options import resolve_options

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, *_ in TRAIN_FLAGS}
    overrides.update({flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                      for flag, _ in TRAIN_SWITCHES})
    targets = list_flag(args.targets)
    if targets and len(targets) == 1 and (targets[0] == "all-linear" or _is_regex(targets[0])):
        targets = targets[0]
    overrides["targets"] = targets
    overrides["modules_to_save"] = list_flag(args.modules_to_save)
    overrides["add_tokens"] = token_list(args.add_tokens)
    overrides["trainable_tokens"] = token_list(args.trainable_tokens)
    overrides["data"] = " ".join(args.data) if args.data else None
    overrides["loss_type"] = args.loss_type
    overrides["rewards"] = list_flag(args.rewards)
    return resolve_options(args.config, overrides)


def _metric_lines(metrics: dict | None, indent: str = "  "):
    if not metrics:
        return
    for key in ("accuracy", "macro_f1", "answer_accuracy", "reward", "preference_accuracy", "rewards/accuracies",
                "rewards/margins", "kl", "loss", "perplexity", "examples"):
        if key in metrics:
            value = metrics[key]
            yield f"{indent}{key:<16} {value:.4f}" if isinstance(value, float) else f"{indent}{key:<16} {value}"
    if "confusion_matrix" in metrics:
        labels = metrics["labels"]
        width = max(8, *(len(label) for label in labels)) + 1
        yield f"{indent}confusion matrix (rows: true, columns: predicted)"
        yield f"{indent}{'':>{width}}" + "".join(f"{label:>{width}}" for label in labels)
        for label, row in zip(labels, metrics["confusion_matrix"]):
            yield f"{indent}{label:>{width}}" + "".join(f"{v:>{width}}" for v in row)
    if "sample_replies" in metrics:
        yield f"{indent}sample replies: {metrics['sample_replies'][:3]}"


def _train(args: argparse.Namespace) -> int:
    from ..training.loop import train

    summary = train(options_from(args))
    if not summary.get("is_main", True):
        return 0  # under torchrun only rank 0 reports

    def human(summary):
        if summary.get("interrupted"):
            return
        yield (f"\n{summary['method']} on {summary['model']} / {summary['data']}: {summary['steps']} steps in "
               f"{summary['train_seconds']} s; {summary['trainable_params']:,} trainable of {summary['total_params']:,}")
        if summary.get("test"):
            yield f"test (weights from step {summary['best_step'] or summary['steps']}):"
            yield from _metric_lines(summary["test"])
        memory = summary.get("memory") or {}
        if memory.get("estimate_bytes"):
            yield (f"memory: peak {memory['peak_bytes'] / 1e6:,.0f} MB measured, "
                   f"{memory['estimate_bytes'] / 1e6:,.0f} MB by `lorakit estimate` for these options")
        yield f"saved: {summary['artifact']}\nloss curve: {summary['loss_curve']}"

    answer(args, summary, human)
    return 130 if summary.get("interrupted") else 0


def _eval(args: argparse.Namespace) -> int:
    if args.lm_eval:
        return _lm_eval(args)
    from ..training.inference import evaluate_run

    metrics = evaluate_run(args.run, args.data, args.split, model_name=args.model, task=args.task, seed=args.seed,
                           limit=args.limit, batch_size=args.batch_size, bf16=args.bf16)

    def human(metrics):
        yield f"{args.run or args.model} on {metrics['data']} [{metrics['split']}]:"
        yield from _metric_lines(metrics)

    return answer(args, metrics, human)


def _lm_eval(args: argparse.Namespace) -> int:
    from ..tools.harness import run_lm_eval

    if not args.run:
        raise ConfigError("--lm-eval evaluates a run: give its directory (lorakit eval RUN --lm-eval TASKS)")
    result = run_lm_eval(args.run, args.lm_eval, include=args.lm_eval_include, compare_base=args.compare_base,
                         limit=args.limit, batch_size=min(args.batch_size, 64), num_fewshot=args.num_fewshot,
                         apply_chat_template=args.apply_chat_template)

    def human(result):
        for task, sides in result["tasks"].items():
            yield f"{task}:"
            for metric, value in sides["adapter"].items():
                if metric.endswith("_stderr"):
                    continue
                base = sides.get("base", {}).get(metric)
                line = f"  {metric:<20} adapter {value:.4f}"
                yield line + (f"   base {base:.4f}   change {value - base:+.4f}" if base is not None else "")

    return answer(args, result, human)


def _read_texts(args) -> list[str]:
    texts = list(args.text or [])
    if args.input:
        from ..training.data import load_splits, read_file_rows

        rows = read_file_rows(args.input)  # a single file: every row, in order
        if rows is None:
            rows = [row for split in load_splits(args.input).values() for row in split]
        texts += [str(row[args.text_column]) for row in rows] if rows and args.text_column in rows[0] else []
        if rows and args.text_column not in rows[0]:
            from ..errors import ConfigError

            raise ConfigError(f"column {args.text_column!r} not in {args.input}; available: {', '.join(rows[0])}")
    if not texts:
        from ..errors import ConfigError

        raise ConfigError("nothing to predict: give --text TEXT (repeatable) or --input FILE")
    return texts


def _predict(args: argparse.Namespace) -> int:
    from ..training.inference import predict

    results = predict(args.run, _read_texts(args), max_new_tokens=args.max_new_tokens)
    for row in results:
        print(json.dumps(row) if args.json else
              (f"{row['label']:>12}  {max(row['probabilities'].values()):.3f}  {row['text'][:90]}" if "label" in row
               else f"{row['text'][:60]!r} -> {row['reply']!r}"))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ..io.runs import read_run
    from ..training.inference import generate, load_for_eval

    if args.run and read_run(args.run)[1].get("task") == "classify":
        raise ConfigError(f"{args.run} is a classifier (task classify): it predicts labels, it does not generate "
                          f"text; use `lorakit predict {args.run} --text ...`")
    import torch

    model, tokenizer, record = load_for_eval(args.run, args.model, "sft" if args.chat else "lm", None,
                                             dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    replies = generate(model, tokenizer, args.prompt, record, args.max_new_tokens, args.temperature)
    for prompt, reply in zip(args.prompt, replies):
        print(json.dumps({"prompt": prompt, "reply": reply}) if args.json else reply)
    return 0


def _own_classifier_base(run: str, base: str) -> bool:
    """Is ``base`` the base a lorakit classifier run at ``run`` was trained on?"""
    from pathlib import Path

    from ..hub.models import resolve_model_path
    from ..io.runs import read_run

    try:
        record = read_run(run)[1]
    except ConfigError:  # any PEFT adapter, not a lorakit run
        return False
    if record.get("task") != "classify" or record.get("full"):
        return False
    return Path(resolve_model_path(base)).resolve() == Path(resolve_model_path(record["model"])).resolve()


def _merge(args: argparse.Namespace) -> int:
    from ..training.inference import merge_run

    # a classifier's head is in the adapter, not in its base checkpoint (a bare encoder whose tensors
    # lack the head model's prefix): the streaming merge has nowhere to put it, so such a run is
    # merged as a whole model; such bases are small
    streaming = bool(args.base) and not _own_classifier_base(args.run, args.base)
    if streaming:  # any PEFT-format adapter onto a safetensors base, shard by shard
        from ..hub.models import resolve_model_path
        from ..io.streaming_merge import stream_merge

        result = stream_merge(args.run, resolve_model_path(args.base), args.output, overwrite=args.overwrite,
                              qlora=True if args.qlora else None)
        return answer(args, result, lambda r: [
            f"merged into {r['output']} shard by shard ({r['shards']} shards, largest "
            f"{r['largest_shard_bytes'] / 1e6:.1f} MB held at a time)"])

    target = merge_run(args.run, args.output, dtype=args.dtype, overwrite=args.overwrite)
    return answer(args, {"merged": str(target)}, lambda r: [
        f"merged model written to {r['merged']} (loads with transformers' from_pretrained, no lorakit needed)"])


def _sweep(args: argparse.Namespace) -> int:
    from ..training.sweep import sweep

    ranks = [int(v) for v in args.ranks.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    result = sweep(options_from(args), ranks, seeds)

    def human(result):
        yield (f"\n{'r':>4} {'trainable':>12} {'lora params':>12}  test {result['rows'][0]['metric']} "
               f"(mean ± std over {len(seeds)} seed(s))")
        for row in result["rows"]:
            mean = "n/a" if row["mean"] is None else f"{row['mean']:.4f} ± {row['std']:.4f}"
            yield f"{row['r']:>4} {row['trainable_params']:>12,} {row['lora_params']:>12,}  {mean}"
        yield f"plot: {result['plot']}"

    return answer(args, result, human)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    s = run_demo(output=args.output, steps=args.steps, seed=args.seed, eval_examples=args.eval_examples,
                 r=args.r, alpha=args.alpha)
    return answer(args, s, lambda s: [
        f"\nLoRA r={s['r']} on every linear layer of MiniLM (all-linear): {s['lora_params']:,} LoRA params "
        f"({s['trainable_params']:,} trainable incl. classifier head, "
        f"{100 * s['trainable_params'] / s['total_params']:.2f}% of {s['total_params']:,})",
        f"trained {s['steps']} steps in {s['train_seconds']} s; loss curve {s['loss_curve']}",
        f"test accuracy {s['test_accuracy']:.4f}, macro-F1 {s['test_macro_f1']:.4f} (reloaded adapter "
        f"{s['reloaded_accuracy']:.4f}, merged model {s['merged_accuracy']:.4f}; max |logit diff| "
        f"{s['max_abs_diff_merged']:.2e})",
        f"adapter ({s['adapter_bytes']:,} bytes): {s['adapter_dir']}\nmerged plain transformers model: {s['merged_dir']}"])


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="fine-tune with LoRA (or --full) on a classify, sft or lm task",
                           description="Options come from an optional YAML file, overridden by flags. Run with "
                                       "`torchrun --nproc_per_node N -m lorakit train ...` for multi-process DDP. "
                                       f"Without tuning flags it uses the {DEFAULTS_WHY}.")
    add_train_flags(train)
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="accuracy / macro-F1 / confusion matrix, or loss / perplexity")
    evaluate.add_argument("run", nargs="?", help="a run directory (or its adapter/ or model/ folder)")
    evaluate.add_argument("--model", help="evaluate a base model without adapter (zero-shot), with --task")
    evaluate.add_argument("--task", choices=["sft", "lm"], help="task for --model")
    evaluate.add_argument("--data", help="data to evaluate on (default: the run's)")
    evaluate.add_argument("--split", default=None, choices=["train", "validation", "test"],
                          help="which split to evaluate (default: test; a --data file is evaluated whole "
                               "unless --split picks one of its training splits)")
    evaluate.add_argument("--limit", type=int, help="first N examples only")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0, help="the split seed the run used")
    evaluate.add_argument("--bf16", action="store_true")
    evaluate.add_argument("--lm-eval", metavar="TASK[,TASK]",
                          help="run EleutherAI's lm-evaluation-harness tasks on the base + adapter (unmerged, "
                               "in-process; pip install 'lorakit[lm-eval]'). Bundled tasks (hellaswag, arc_easy, "
                               "...) fetch their data from the Hugging Face hub, so need a connection or a filled "
                               "cache; offline, write lm-eval YAML tasks over local JSON files and give their "
                               "directory with --lm-eval-include")
    evaluate.add_argument("--lm-eval-include", metavar="DIR", help="a directory of lm-eval task YAML files")
    evaluate.add_argument("--compare-base", action="store_true",
                          help="--lm-eval: also evaluate the base alone (adapters off) and print both")
    evaluate.add_argument("--num-fewshot", type=int, help="--lm-eval: few-shot examples per prompt")
    evaluate.add_argument("--apply-chat-template", action="store_true",
                          help="--lm-eval: format prompts with the tokenizer's chat template (for sft runs)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_eval)

    predict = sub.add_parser("predict", help="labels (classify) or replies (sft/lm) for new texts")
    predict.add_argument("run")
    predict.add_argument("--text", action="append", help="a text to predict (repeatable)")
    predict.add_argument("--input", help="a CSV/JSONL/parquet/text file of texts")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--max-new-tokens", type=int, default=64)
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.set_defaults(func=_predict)

    generate = sub.add_parser("generate", help="generate text with a trained run or a base model")
    generate.add_argument("run", nargs="?")
    generate.add_argument("--model", help="a base model instead of a run")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (with --model)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                          help="the base's dtype (a QLoRA run's base is 4-bit either way; this is then the dtype of "
                               "its embeddings and norms); bf16 halves a large model's memory")
    generate.add_argument("--json", action="store_true")
    generate.set_defaults(func=_generate)

    merge = sub.add_parser("merge", help="fold the adapter into the base and save a plain transformers model")
    merge.add_argument("run", help="a `lorakit train` run, or with --base any PEFT-format adapter directory")
    merge.add_argument("--base", help="the base model (safetensors, sharded or not): merge shard by shard, holding one "
                                      "shard at a time, into a copy of the base's own layout")
    merge.add_argument("--output", required=True)
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    merge.add_argument("--qlora", action="store_true",
                       help="with --base: the adapter was trained on the 4-bit (NF4) base; its weights are merged "
                            "into the dequantized base (found in a lorakit run record without this flag)")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(func=_merge)

    sweep = sub.add_parser("sweep", help="train at several ranks (and seeds): table and plot of metric vs rank")
    add_train_flags(sweep)
    sweep.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks")
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds; the table averages them")
    sweep.set_defaults(func=_sweep)

    demo = sub.add_parser("demo", help="fine-tune MiniLM on rotten-tomatoes with LoRA, evaluate, save, merge",
                          description="The embedded default job; runs offline in a few minutes on a CPU.")
    demo.add_argument("--output", default="lorakit-demo", help="directory for the log, adapter and merged model")
    demo.add_argument("--steps", type=int, default=300, help="training steps (batch 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--r", type=int, default=8, help="LoRA rank")
    demo.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    demo.add_argument("--eval-examples", type=int, default=None, help="evaluate on the first N test examples only")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=_demo)


__all__ = ["add_commands"]
