"""DPO and GRPO steps: lorakit vs TRL (DPOTrainer / GRPOTrainer on a PEFT LoRA model), side by side.

    python -m benchmarks.preference [--task dpo grpo] [--batch 4] [--group 4] [--completion 32]
                                    [--steps 3] [--dtypes fp32] [--rounds 2]

SmolLM2-135M-Instruct, r=16 on every linear layer (lora_alpha 32, dropout 0), the same data for
both: rotten-tomatoes reviews as chat prompts (the embedded preference set: the right label chosen,
the other rejected; for GRPO the prompt and its label, rewarded by answer_match; reviews under 600
characters, so no prompt reaches the 256-token limit). TRL tokenizes with
its own code; the parity tests prove both give the same token ids.

DPO step = loss (policy forward of chosen + rejected, the reference forward with the adapter off,
no grad) + backward + AdamW step, on --batch pairs: lorakit's objective (training/objectives/
pairwise.py, what `lorakit train --task dpo` runs per micro-batch) vs TRL's compute_loss.
GRPO step = rollouts (--batch prompts x --group completions of up to --completion tokens,
temperature 1, rewards, advantages) + loss + backward + AdamW step: lorakit's Grpo objective
(rollouts through the serving engine) vs TRL's _generate_and_score_completions + compute_loss with
use_vllm=False (transformers' generate on the PEFT model). Rollout tokens/s = completion tokens /
the rollout phase.

Each case runs in a fresh child process; time is the fastest step of each child and rounds are
interleaved; peak memory = peak RSS during the steps (the warm-up step included) minus RSS before
the first of them (the loaded model with its adapter): activations, gradients, optimizer state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import print_table, run_child

MODEL = "smollm2-135m"


def _rows(task: str, n: int) -> list[dict]:
    from lorakit.training.data import load_splits
    from lorakit.training.objectives.data import embedded_rows

    short = [r for r in load_splits("rotten-tomatoes", 0)["train"] if len(r["text"]) < 600]  # prompts < 256 tokens
    return embedded_rows(task, short[:n])


def _model():
    from lorakit.hub.models import load_model

    return load_model(MODEL, "sft")


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _options(task: str, **kw):
    import warnings

    from lorakit.training.options import resolve_options

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_options(None, dict(task=task, model=MODEL, data="rotten-tomatoes", output="unused", r=16,
                                          dropout=0.0, seq_len=256, **kw))


def _stand_in(model):
    import types

    import torch

    from lorakit.training.objectives.base import TokenLogProbLM

    runner = TokenLogProbLM(model)
    dist = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, to_device=lambda b: b,
                                 sum=lambda v: v)
    return types.SimpleNamespace(model=model, wrapped=runner, runner_module=runner, dist=dist, step=0)


def _lorakit(model, tokenizer, rows, options):
    """lorakit's side: the adapter injected (the base cast to bf16 with --bf16), the task's objective
    prepared on the encoded rows, and an AdamW over what trains."""
    import torch

    import lorakit as lk
    from lorakit.training.objectives import objective_for

    lk.inject(model, options.lora_config())
    if options.bf16:
        lk.cast_base(model, torch.bfloat16)
    objective = objective_for(options, tokenizer, 256)
    examples = objective.encode(rows, "train")
    trainer = _stand_in(model)
    trainer.encoded = {"train": examples}
    objective.prepare(trainer)
    model.train()
    return objective, examples, trainer, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _timed(steps: int, step) -> dict:
    import torch

    from lorakit.training.memory import peak_since_reset, reset_peak, resident_bytes

    before = resident_bytes()  # the model and its adapter, loaded
    reset_peak(torch.device("cpu"))
    step()  # warm-up: optimizer state, first-call costs (inside the measured peak)
    times, extra = [], []
    for _ in range(steps):
        start = time.perf_counter()
        extra.append(step())
        times.append(time.perf_counter() - start)
    best = min(range(steps), key=lambda i: times[i])
    return {"step_s": times[best], "peak_mb": peak_since_reset(torch.device("cpu"), before) / 2 ** 20,
            **(extra[best] or {})}


def dpo_child(impl: str, batch: int, steps: int, dtype: str) -> dict:
    import torch

    torch.manual_seed(0)
    bf16 = dtype == "bf16"
    model, tokenizer = _model()
    rows = _rows("dpo", batch)
    if impl == "lorakit":
        objective, examples, trainer, optimizer = _lorakit(model, tokenizer, rows, _options("dpo", bf16=bf16))

        def step():
            loss, _, _ = objective._loss(trainer, examples, grad=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir="/tmp/lorakit-bench-trl", report_to=[], use_cpu=True, bf16=bf16,
                         per_device_train_batch_size=batch, max_length=256, beta=0.1, learning_rate=1e-5)
        if bf16:
            model = model.to(torch.bfloat16)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=_peft_config())
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        trainer.model.train()
        optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = trainer.compute_loss(trainer.model, inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return _timed(steps, step)


def grpo_child(impl: str, batch: int, group: int, completion: int, steps: int, dtype: str) -> dict:
    import torch

    torch.manual_seed(0)
    bf16 = dtype == "bf16"
    model, tokenizer = _model()
    rows = _rows("grpo", batch * steps + batch)
    cursor = iter(range(0, len(rows), batch))
    if impl == "lorakit":
        options = _options("grpo", bf16=bf16, num_generations=group, max_completion_length=completion, batch_size=batch)
        objective, examples, trainer, optimizer = _lorakit(model, tokenizer, rows, options)

        sampled = {}

        def full_length_sample(*a, **kw):  # every completion at full length, as TRL's min_new_tokens below
            began = time.perf_counter()
            out = type(objective).sample(objective, *a, **kw, ignore_eos=True)
            sampled.update(seconds=time.perf_counter() - began, tokens=sum(len(o["token_ids"]) for o in out))
            return out

        objective.sample = full_length_sample

        def step():
            start = next(cursor)
            objective.generation = start
            objective._generate(trainer, [examples[start:start + batch]])  # rollouts, rewards, advantages
            loss, _, logs = objective.loss_on(trainer, objective.rollouts[0])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {"rollout_s": sampled["seconds"], "rollout_tokens": sampled["tokens"]}
    else:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from lorakit.training.objectives.rewards import answer_match

        reward = answer_match(r"([^\W_]+)", "label")
        reward.__name__ = "answer_match"
        args = GRPOConfig(output_dir="/tmp/lorakit-bench-trl", report_to=[], use_cpu=True, bf16=bf16,
                          per_device_train_batch_size=batch * group, num_generations=group,
                          max_completion_length=completion, temperature=1.0, learning_rate=1e-5, beta=0.0,
                          steps_per_generation=1,
                          generation_kwargs={"min_new_tokens": completion})  # full length, as lorakit's ignore_eos
        if bf16:
            model = model.to(torch.bfloat16)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=_peft_config())
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            start = next(cursor)
            inputs = [row for row in rows[start:start + batch] for _ in range(group)]
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                scored = trainer._generate_and_score_completions(inputs)
            rollout = time.perf_counter() - began
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = trainer.compute_loss(trainer.model, scored)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {"rollout_s": rollout, "rollout_tokens": float(scored["completion_mask"].sum())}
    result = _timed(steps, step)
    result["rollout_tokens_per_s"] = result["rollout_tokens"] / result["rollout_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", default=["dpo", "grpo"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, impl, dtype = args.child
        if task == "dpo":
            result = dpo_child(impl, args.batch, args.steps, dtype)
        else:
            result = grpo_child(impl, args.batch, args.group, args.completion, args.steps, dtype)
        print(json.dumps(result))
        return
    common = ["--batch", str(args.batch), "--group", str(args.group), "--completion", str(args.completion),
              "--steps", str(args.steps)]
    results: dict = {}
    for _ in range(args.rounds):
        for task in args.task:
            for dtype in args.dtypes:
                for impl in ("trl", "lorakit"):
                    got = run_child("benchmarks.preference", *common, "--child", task, impl, dtype)
                    key = (task, dtype, impl)
                    if key not in results or got["step_s"] < results[key]["step_s"]:
                        results[key] = got
                    print(f"  {task} {dtype} {impl}: {got}", file=sys.stderr)
    rows = []
    for task in args.task:
        for dtype in args.dtypes:
            trl, ours = results[(task, dtype, "trl")], results[(task, dtype, "lorakit")]
            for impl, m in (("trl", trl), ("lorakit", ours)):
                rollout = f"{m['rollout_tokens_per_s']:.0f}" if "rollout_tokens_per_s" in m else "-"
                rows.append((task, dtype, impl, f"{m['step_s']:.2f}", f"{m['peak_mb']:.0f}", rollout,
                             f"{m['step_s'] / trl['step_s']:.2f}", f"{m['peak_mb'] / max(1e-9, trl['peak_mb']):.2f}",
                             f"{m['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}"
                             if "rollout_tokens_per_s" in m else "-"))
    print_table(f"preference / RL steps, {MODEL}, r=16 all-linear, batch {args.batch}"
                + (f", G={args.group}, {args.completion} completion tokens" if "grpo" in args.task else ""),
                rows, ("task", "dtype", "impl", "s/step", "peak MB", "rollout tok/s", "x TRL time", "x TRL memory",
                       "x TRL rollout"))


if __name__ == "__main__":
    main()
