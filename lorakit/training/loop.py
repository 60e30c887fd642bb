"""The training loop behind `lorakit train`: LoRA (or full) fine-tuning on one or many processes.

Why not transformers' Trainer: its checkpoints hold the whole model and are written in place; a
LoRA run wants adapter-only checkpoints, written atomically, that resume onto an identical loss curve.
The loop is small; batching order is a pure function of (seed, epoch, position), so resuming needs
only the step counter, the optimizer/scheduler state and the RNG state.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import lorakit as lk

from ..errors import ConfigError, TrainingDivergedError
from ..hub.models import fit_vocabulary, load_empty, load_model, resolve_model_path
from ..io.atomic import staged_directory, staged_file
from ..io.runs import RUN_FILE, run_record
from ..kernels.losses import ChunkedLossLM, supports_chunked_loss
from ..model.injection import materialize_adapters
from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from .data import (
    EMBEDDED_DATA,
    EMBEDDED_SFT_TEMPLATES,
    Truncation,
    answer_tokens,
    collate,
    encode,
    label_names,
    load_splits,
    require_rows,
)
from .distributed import Distributed
from .evaluation import evaluate, split_metrics
from .learning_check import learning_check
from .memory import check_run_fits, estimated_bytes, peak_bytes, peak_since_reset, reset_peak, resident_bytes
from .neftune import add_neftune
from .objectives import OBJECTIVE_TASKS, objective_for
from .objectives.base import mean_logs
from .objectives.data import embedded_rows
from .optim import build_optimizer, build_scheduler
from .options import TrainOptions, save_options
from .packing import pack_examples
from .placement import placement_for
from .reporting import Reporter, json_record
from .setup import (
    add_and_choose_tokens,
    clamp_seq_len,
    prepare_model,
    prepare_output,
    shards_from_files,
    usable_seq_len,
)

BEST = "best_trainable.safetensors"
BAR_KEYS = ("reward", "kl", "rewards/accuracies", "rollout_tokens_per_s")  # shown beside the loss


def _triplet_params(model, path: str) -> int:
    """What one AdaLoRA triplet of an adapted linear layer costs: an A row, a B column and its λ."""
    layer = model.get_submodule(path)
    return layer.in_features + layer.out_features + 1


class Trainer:
    """One run. `run()` trains, selects the best validation checkpoint and writes the artifacts."""

    def __init__(self, options: TrainOptions, dist: Distributed | None = None, quiet: bool = False):
        self.options, self.dist, self.quiet = options, dist or Distributed.from_env(), quiet
        self.output = Path(options.output)
        self._check_memory()  # before anything is written or loaded
        prepare_output(self.output, options, self.dist)
        random.seed(options.seed)
        torch.manual_seed(options.seed)
        self._load_data()
        model = self._load_model()
        self.objective = objective_for(options, self.tokenizer, self.seq_len)  # None: classify, sft, lm
        self._encode_splits()
        self._plan_steps()
        self._place_model(model)
        self.optimizer = build_optimizer(self.model, options)
        self.scheduler = build_scheduler(self.optimizer, options, self.total_steps)
        self.reporter = Reporter(self.output, options.report_to) if self.dist.is_main else Reporter(None, None)
        self.step, self.best, self.best_step, self.bad_evals = 0, None, None, 0
        self.train_peak_measured, self.setup_bytes, self.setup_peak = False, None, 0
        self.interrupted = False

    def _check_memory(self) -> None:
        """A run larger than the machine's memory is refused with the estimate's figures (causal
        LMs with the estimate's optimizers; classifiers and AdaLoRA have no estimate)."""
        from transformers import AutoConfig

        o = self.options
        if o.task == "classify":
            return
        config = AutoConfig.from_pretrained(resolve_model_path(o.model))
        check_run_fits(config, o, usable_seq_len(o.seq_len, config), nproc=self.dist.world_size)

    def _load_data(self) -> None:
        """The splits, and for classify the label names (at least two)."""
        o = self.options
        self.rows = load_splits(o.data, o.seed)
        require_rows(self.rows["train"], "train", o.data)
        self.labels = label_names(self.rows["train"], o.label_column) if o.task == "classify" else None
        if o.task in OBJECTIVE_TASKS and o.data in EMBEDDED_DATA:
            if o.data != "rotten-tomatoes":
                raise ConfigError(f"--task {o.task}: the embedded set {o.data!r} has no preference layout; use "
                                  "rotten-tomatoes or give a file (see --help for the layouts)")
            self.rows = {split: embedded_rows(o.task, rows) for split, rows in self.rows.items()}
        if o.task == "classify" and self.labels is not None and len(self.labels) < 2:
            raise ConfigError(f"the train split has a single label ({self.labels[0]}); classify needs at least two")

    def _load_model(self):
        """The base model for the task (its head sized to the labels), its tokenizer, and what the
        model decides about encoding: the usable sequence length, SFT templates."""
        o = self.options
        self.rss_before_model = resident_bytes()
        # QLoRA: straight into 4 bits, tensor by tensor (the full-precision model never in memory);
        # with --bf16 the rest of the frozen base (embeddings, norms, head) in bf16, as for LoRA
        quantize = (torch.bfloat16 if o.bf16 else torch.float32) if o.qlora and not o.full else None
        task = "sft" if o.task in OBJECTIVE_TASKS else o.task
        self.checkpoint = None  # FSDP: the model on the meta device, each process reading its own shards
        if o.fsdp and self.dist.world_size > 1 and shards_from_files(o):
            self.checkpoint, self.tokenizer = load_empty(o.model, task, self.labels, dtype=quantize, quantize=quantize)
        if self.checkpoint is not None:
            model = self.checkpoint.model
        else:
            model, self.tokenizer = load_model(o.model, task, self.labels, quantize=quantize, dtype=quantize)
        if o.adapter:  # continuing an adapter whose run added tokens: its tokenizer, the embedding resized
            self.tokenizer = fit_vocabulary(model, o.adapter) or self.tokenizer
        self.token_indices = add_and_choose_tokens(model, self.tokenizer, o)
        self.seq_len = clamp_seq_len(o.seq_len, model)
        self.templates = (o.prompt_template, o.response_template)
        if o.task == "sft" and not any(self.templates) and o.data in EMBEDDED_SFT_TEMPLATES:
            self.templates = EMBEDDED_SFT_TEMPLATES[o.data]
        return model

    def _encode_splits(self) -> None:
        """Every split tokenized (validation / test capped at --eval-examples), truncation reported,
        the train split packed with --packing; refused when no row keeps a token to learn from."""
        o, cap, truncation = self.options, self.options.eval_examples, Truncation(self.seq_len)
        if self.objective is not None:
            self.encoded = {split: self.objective.encode(rows if split == "train" or cap is None else rows[:cap], split)
                            for split, rows in self.rows.items()}
            if not self.encoded["train"]:
                raise ConfigError(f"no training row is left at --seq-len {self.seq_len}; raise --seq-len")
            return
        self.encoded = {split: self._encode(rows if split == "train" or cap is None else rows[:cap], split, truncation)
                        for split, rows in self.rows.items()}
        if self.dist.is_main:
            truncation.report()
        if o.task != "classify" and not answer_tokens(self.encoded["train"]):
            raise ConfigError(f"no training row keeps a token to learn from at --seq-len {self.seq_len} (every answer "
                              "is empty or cut away); raise --seq-len or check the answer column / --response-template")
        if o.packing:
            self.encoded["train"] = pack_examples(self.encoded["train"], self.seq_len)

    def _plan_steps(self) -> None:
        """Micro-batches per epoch, optimizer steps in all, evaluation interval; refused when the
        train split holds less than one step."""
        o = self.options
        per_micro = o.batch_size * self.dist.world_size
        self.micro_per_epoch = len(self.encoded["train"]) // per_micro
        if self.micro_per_epoch < o.grad_accum:
            raise ConfigError(f"the train split has {len(self.encoded['train'])} examples, fewer than one step of "
                              f"{per_micro * o.grad_accum} (batch size x processes x grad accum); lower --batch-size")
        steps_per_epoch = self.micro_per_epoch // o.grad_accum * (o.num_iterations if o.task == "grpo" else 1)
        self.total_steps = o.max_steps or max(o.min_steps or 1, math.ceil(o.epochs * steps_per_epoch))
        self.eval_steps = o.eval_steps or steps_per_epoch

    def _place_model(self, model) -> None:
        """Adapters injected, and what runs the step placed: causal LMs train through the chunked
        loss (never the full logits); DDP wraps, or FSDP shards, it; the optimizer is built after
        sharding, on the shards."""
        o = self.options
        self.adalora, self.placement = o.method == "adalora", placement_for(o.fsdp, self.checkpoint)
        self.model = prepare_model(model, o, self.total_steps, self.token_indices)
        if self.checkpoint is not None:  # the adapters' initial values, drawn as prepare_model's injection drew them
            torch.manual_seed(o.seed)
            materialize_adapters(self.model)
        self.report = lk.trainable_parameters(self.model)
        causal = o.task != "classify" and supports_chunked_loss(self.model)
        self.wrapped_is_chunked = causal
        if self.objective is not None:  # the step runs token log-probabilities (DDP wraps that module)
            self.runner_module = self.objective.runner(self.model)
            runner = self.runner_module
        else:
            runner = ChunkedLossLM(self.model) if causal else self.model
        self.wrapped = self.placement.place(self.model, runner, self.dist)
        if o.compile:  # the weights stay the model's own: saving and evaluation use self.model
            self.wrapped = torch.compile(self.wrapped)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.evaluates = self.placement.evaluates(self.dist)
        # AdaLoRA's orthogonality penalty joins the model's own loss (a hook, as in PEFT); the chunked
        # loss bypasses the model's output, so the loop adds it there
        self.add_penalty = self.adalora and causal

    def _encode(self, rows, split, truncation):
        o = self.options
        has_labels = o.task != "classify" or not rows or o.label_column in rows[0]
        if split != "train" and not has_labels:
            return None  # e.g. an unlabelled test file: usable by `predict`, not for metrics
        return encode(rows, self.tokenizer, o.task, self.seq_len, split, text_column=o.text_column,
                      label_column=o.label_column, labels=self.labels, prompt_template=self.templates[0],
                      response_template=self.templates[1], truncation=truncation)

    # batching: a pure function of (seed, epoch, micro-batch index, rank)
    def micro_batch(self, micro: int) -> list[dict]:
        epoch, index = divmod(micro, self.micro_per_epoch)
        order = list(range(len(self.encoded["train"])))
        random.Random(self.options.seed * 1000 + epoch).shuffle(order)
        start = (index * self.dist.world_size + self.dist.rank) * self.options.batch_size
        return [self.encoded["train"][i] for i in order[start:start + self.options.batch_size]]

    def run(self) -> dict:
        finished = False
        try:
            result = self._run()
            finished = True
            return result
        finally:
            self.reporter.close(finished)  # a tracker's run is marked failed when this one failed
            if self.objective is not None:
                self.objective.close()  # the rollout engine's thread

    def _run(self) -> dict:
        o = self.options
        if self.objective is not None:  # reward probes, precomputed references, the rollout engine: before any file
            self.objective.prepare(self)
        if o.resume:
            self._resume()
        elif self.dist.is_main:
            save_options(o, self.output / "train_config.yaml")
            (self.output / "train_log.jsonl").write_text("")
        self.reporter.start(o.to_dict())
        neftune = add_neftune(self.model, o.neftune_noise_alpha) if o.neftune_noise_alpha else None
        log = open(self.output / "train_log.jsonl", "a") if self.dist.is_main else None
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.dist.is_main or self.quiet)
        started, tokens_seen = time.perf_counter(), 0
        self.setup_bytes = resident_bytes() - self.rss_before_model  # the model as it trains (sharded under FSDP)
        self.setup_peak = peak_bytes(self.dist.device, self.rss_before_model)  # the reset below clears it
        self.train_peak_measured = reset_peak(self.dist.device)
        try:
            while self.step < self.total_steps:
                loss, tokens, stop, extra = self._train_step()
                self.step += 1
                tokens_seen += tokens
                speed = tokens_seen / max(1e-9, time.perf_counter() - started)
                lr = self.scheduler.get_last_lr()[0]
                if log and (self.step % o.log_every == 0 or self.step == self.total_steps):
                    log.write(json_record({"step": self.step, "epoch": round(self.step * o.grad_accum / self.micro_per_epoch, 4),
                                          "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(speed, 1),
                                          **{k: round(v, 6) for k, v in extra.items()}}) + "\n")
                    log.flush()
                    self.reporter.scalars(self.step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": speed,
                                                      **{f"train/{k}": v for k, v in extra.items()}})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}",
                                **{k.replace("/", "_"): f"{extra[k]:.3g}" for k in BAR_KEYS if k in extra})
                bar.update()
                if self.step % self.eval_steps == 0 or self.step == self.total_steps:
                    if self._evaluate_and_select(log):
                        break
                if stop:
                    self.interrupted = True
                    break
                if o.save_steps and self.step % o.save_steps == 0:
                    self._checkpoint()
        finally:
            bar.close()
            if neftune is not None:  # as transformers' Trainer: the noise is for training only
                neftune.remove()
            signal.signal(signal.SIGINT, previous)
            if log:
                log.close()
        self._checkpoint()
        if self.interrupted:
            if self.dist.is_main:
                print(f"interrupted at step {self.step}; checkpoint saved, continue with --resume", file=sys.stderr)
            return {"interrupted": True, "step": self.step, "output": str(self.output)}
        return self._finish(time.perf_counter() - started)

    def _on_interrupt(self, signum, frame):
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True
        if self.dist.is_main:
            print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)", file=sys.stderr)

    def _train_step(self) -> tuple[float, int, bool, dict]:
        o = self.options
        self.wrapped.train()
        loss_sum, tokens, logs = 0.0, 0, []
        for k in range(o.grad_accum):
            if self.objective is not None:
                micro = self.objective.data_micro(self.step, k)
                with self.placement.no_sync(self.wrapped, k == o.grad_accum - 1, self.dist):
                    loss, micro_tokens, micro_logs = self.objective.micro_loss(self, self.micro_batch(micro), micro)
                    loss.backward()
                loss_sum += float(loss.detach())
                tokens += micro_tokens
                logs.append(micro_logs)
                continue
            examples = self.micro_batch(self.step * o.grad_accum + k)
            batch = self.dist.to_device(collate(examples, self.tokenizer.pad_token_id))
            with self.placement.no_sync(self.wrapped, k == o.grad_accum - 1, self.dist), \
                    torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=o.bf16):
                # packed rows: no KV cache, so transformers reads the position restarts as boundaries
                extra = {"use_cache": False} if "position_ids" in batch else {}
                extra.update(self.placement.step_kwargs(self.wrapped_is_chunked))
                loss = self.wrapped(**batch, **extra).loss
                if self.add_penalty:
                    loss = loss + lk.adalora_penalty(self.model)
                loss = loss / o.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
            tokens += sum(len(e["input_ids"]) for e in examples)
        norm = torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm) if o.max_grad_norm else None
        if not math.isfinite(loss_sum) or (norm is not None and not math.isfinite(float(norm))):
            # stop before the step writes NaN into the weights; nothing of this run is saved
            what = f"loss {loss_sum:g}" if not math.isfinite(loss_sum) else f"gradient norm {float(norm):g}"
            raise TrainingDivergedError(
                f"training diverged at step {self.step + 1}: the {what} is not finite. Nothing was saved from this "
                f"step on; lower --lr (now {o.lr:g}), keep --max-grad-norm on, or drop --bf16 / --qlora to check "
                "the numerics; earlier checkpoints in the run directory are intact.")
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora:  # after the step, before the gradients go (PEFT's order)
            lk.update_and_allocate(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean, tokens_all, stop = self.dist.reduce_step(loss_sum, tokens, self.interrupted)
        return loss_mean, tokens_all, stop, mean_logs(logs)

    def _evaluate_and_select(self, log) -> bool:
        """Evaluate on the validation split, keep the best weights; True when early stopping fires."""
        examples = self.encoded.get("validation")
        if not examples:
            return False
        stop = False
        if self.evaluates:
            if self.objective is not None:
                self.model.eval()
                metrics = self.objective.evaluate(self, examples)
                score = self.objective.score(metrics)
            else:
                metrics = evaluate(self.model, examples, self.options.task, self.tokenizer.pad_token_id, self.labels,
                                   bf16=self.options.bf16)
                score = metrics["accuracy"] if self.options.task == "classify" else -metrics["loss"]
            self.reporter.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()
                                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if self.best is None or score > self.best:
                self.best, self.best_step, self.bad_evals = score, self.step, 0
                best = self._trainable_state()  # under FSDP a gather every process joins
                if self.dist.is_main:
                    _atomic_save(best, self.output / BEST)
            else:
                self.bad_evals += 1
            patience = self.options.early_stopping_patience
            stop = bool(patience and self.bad_evals >= patience)
            brief = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "labels")}
            if self.dist.is_main:
                log.write(json_record({"step": self.step, "eval": brief, "best_step": self.best_step}) + "\n")
                log.flush()
                if not self.quiet:
                    tqdm.write(f"step {self.step}: validation {_fmt(brief)}{' (best)' if self.best_step == self.step else ''}",
                               file=sys.stderr)
                if stop and not self.quiet:
                    tqdm.write(f"early stopping: no improvement in {patience} evaluations", file=sys.stderr)
        return self.dist.broadcast_flag(stop)

    def _trainable_state(self) -> dict:
        with self.placement.whole_trainable(self.model):  # a gather when sharded: every process joins
            return trainable_state(self.model)

    def _progress(self) -> dict:
        return {"step": self.step, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "total_steps": self.total_steps}

    def _checkpoint(self) -> None:
        trainable = self._trainable_state()
        optimizer = self.placement.optimizer_state(self.model, self.optimizer)
        if self.dist.is_main:
            save_checkpoint(self.output, trainable, optimizer, self.scheduler, self._progress())
        self.dist.barrier()

    def _resume(self) -> None:
        found = find_checkpoint(self.output)
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {self.output}; start without --resume")
        progress = load_checkpoint(found, self.model, self.optimizer, self.scheduler, placement=self.placement)
        self.step, self.best, self.best_step = progress["step"], progress["best"], progress["best_step"]
        self.bad_evals = progress["bad_evals"]
        if progress["total_steps"] != self.total_steps:
            raise ConfigError(f"--resume: the checkpoint was made for {progress['total_steps']} steps, this run plans "
                              f"{self.total_steps}; resume with the same options")
        if self.dist.is_main:  # drop log lines written after the checkpoint, so the curve has no duplicates
            path = self.output / "train_log.jsonl"
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in lines))
            print(f"resuming from step {self.step} of {self.total_steps}", file=sys.stderr)

    def _finish(self, train_seconds: float) -> dict:
        o = self.options
        self.dist.barrier()  # rank 0's best weights are on disk
        if self.best_step is not None and (self.output / BEST).is_file():
            self.placement.load_trainable(self.model, load_file(str(self.output / BEST)))
        summary = {"output": str(self.output), "task": o.task, "model": o.model, "data": o.data,
                   "method": "full" if o.full else ("qlora" if o.qlora else "lora"), "r": None if o.full else o.r,
                   "steps": self.step, "best_step": self.best_step, "train_seconds": round(train_seconds, 1),
                   "trainable_params": self.report.trainable, "total_params": self.report.total,
                   "lora_params": self.report.lora, "train_examples": len(self.encoded["train"])}
        if self.adalora:  # where the budget went: live triplets per layer, and their total
            ranks = lk.current_ranks(self.model)
            summary["adalora_ranks"] = ranks
            summary["adalora_live_params"] = sum(k * _triplet_params(self.model, p) for p, k in ranks.items())
        train_peak = peak_since_reset(self.dist.device, self.rss_before_model) if self.train_peak_measured else None
        whole_run = max(self.setup_peak, train_peak) if train_peak is not None else \
            peak_bytes(self.dist.device, self.rss_before_model)
        summary["memory"] = {"peak_bytes": whole_run, "train_peak_bytes": train_peak, "setup_peak_bytes": self.setup_peak,
                             "resident_after_setup_bytes": self.setup_bytes,
                             "estimate_bytes": estimated_bytes(self.model.config, o, self.seq_len,
                                                               chunked_loss=self.wrapped_is_chunked,
                                                               nproc=self.dist.world_size)}
        test = self.test_metrics() if self.evaluates else None
        artifact = self._write_artifact()  # under FSDP every process joins its gather
        if self.dist.is_main:
            summary["test"] = test
            summary["learning_check"] = learning_check(o.task, summary["test"], self.output / "train_log.jsonl")
            if not summary["learning_check"]["ok"]:
                print(f"\nWARNING: {summary['learning_check']['message']}\n", file=sys.stderr)
            summary["artifact"] = str(artifact)
            from ..tools.plots import loss_curve

            summary["loss_curve"] = str(loss_curve(self.output / "train_log.jsonl", self.output / "loss_curve.png",
                                                   metric="reward" if o.task == "grpo" else "loss"))
            (self.output / "summary.json").write_text(json_record(summary, indent=2) + "\n")
            self.reporter.finish(summary, [artifact, Path(summary["loss_curve"]), self.output / "summary.json"])
        else:
            summary["is_main"] = False
        self.dist.barrier()
        return summary

    def test_metrics(self) -> dict | None:
        examples = self.encoded.get("test")
        if not examples:
            return None
        if self.objective is not None:
            self.model.eval()
            return self.objective.evaluate(self, examples)
        cap = self.options.eval_examples
        rows = self.rows["test"][:cap] if cap else self.rows["test"]
        return split_metrics(self.model, self.tokenizer, self.options.task, examples, rows, self.labels,
                             self.templates, bf16=self.options.bf16)

    def _write_artifact(self) -> Path:
        """output/adapter (PEFT format) or output/model (full fine-tune), with the tokenizer and the run
        record, staged and renamed into place as a whole (rank 0 writes; under FSDP all gather)."""
        target = self.output / ("model" if self.options.full else "adapter")
        with self.placement.whole_trainable(self.model):
            if self.dist.is_main:
                self._write_files(target)
        return target

    def _write_files(self, target: Path) -> None:
        with staged_directory(target) as staging:
            if self.options.full:
                self.model.save_pretrained(staging)
            else:
                lk.save_adapter(self.model, staging)
            self.tokenizer.save_pretrained(staging)
            record = run_record(self.options, self.labels, self.seq_len, *self.templates)
            (staging / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _atomic_save(tensors: dict, path: Path) -> None:
    with staged_file(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def train(options: TrainOptions, quiet: bool = False) -> dict:
    dist = Distributed.from_env()
    try:
        return Trainer(options, dist, quiet=quiet).run()
    finally:
        dist.close()
