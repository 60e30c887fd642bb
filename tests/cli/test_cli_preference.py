"""`lorakit train --task dpo | orpo | kto | grpo` end to end on a tiny Llama, and the bad input
these tasks refuse before the first step, with nothing written."""

import json

import pytest

from tests.helpers import review_rows, run_cli

SMALL = ["--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1", "--lr", "1e-2",
         "--eval-steps", "2"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(role, text):
    return [{"role": role, "content": text}]


def preference_rows(n=40):
    rows = []
    for r in review_rows(n):
        other = "negative" if r["label"] == "positive" else "positive"
        rows.append({"prompt": chat("user", r["text"]), "chosen": chat("assistant", r["label"]),
                     "rejected": chat("assistant", other)})
    return rows


def layouts(tmp_path):
    rows = review_rows(40)
    return {
        "dpo": write_jsonl(tmp_path / "pairs.jsonl", preference_rows()),
        "orpo": write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": r["text"] + " : " + r["label"],
                                                           "rejected": r["text"] + " : not " + r["label"]} for r in rows]),
        "kto": write_jsonl(tmp_path / "kto.jsonl", [{"prompt": r["text"], "completion": " " + r["label"] if i % 2 else " bad",
                                                     "label": bool(i % 2)} for i, r in enumerate(rows)]),
        "grpo": write_jsonl(tmp_path / "grpo.jsonl", [{"prompt": chat("user", r["text"]), "answer": r["label"]}
                                                      for r in rows]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("task,extra,logged", [
    ("dpo", [], "rewards/accuracies"), ("dpo", ["--loss", "ipo", "--precompute-ref"], "rewards/margins"),
    ("dpo", ["--loss", "simpo"], "preference_accuracy"), ("orpo", [], "log_odds_ratio"), ("kto", [], "kl"),
    ("grpo", ["--num-generations", "2", "--max-completion-length", "4", "--beta", "0.04"], "rollout_tokens_per_s")])
def test_each_task_trains_logs_and_saves_a_peft_adapter(causal_dir, tmp_path, capsys, task, extra, logged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = layouts(tmp_path)[task]
    code, out, err = run_cli(capsys, "train", "--task", task, "--model", causal_dir, "--data", data,
                             "--output", tmp_path / "run", *SMALL, *extra, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["task"] == task and summary["steps"] == 4 and summary["test"]["examples"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(logged in r for r in steps)
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_dir), tmp_path / "run" / "adapter")
    code, _, err = run_cli(capsys, "generate", tmp_path / "run", "--prompt", "the film", "--max-new-tokens", "2")
    assert code == 0, err  # the run is a chat model to generate with, as an sft run is


@pytest.mark.slow
@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_resume_after_ctrl_c_gives_the_same_curve(causal_dir, tmp_path, monkeypatch, task):
    import signal

    from lorakit.training.loop import Trainer, train
    from tests.helpers import train_options

    data = layouts(tmp_path)[task]
    extra = {"num_generations": 2, "max_completion_length": 4} if task == "grpo" else {}
    options = lambda out, **kw: train_options(causal_dir, str(data), out, task=task, max_steps=6, batch_size=4,  # noqa: E731
                                              lr=1e-2, eval_steps=3, **extra, **kw)
    train(options(tmp_path / "straight"), quiet=True)
    original = Trainer.micro_batch

    def interrupt_at_step_3(self, micro):
        if micro == 3 and not getattr(self, "_raised", False):  # a real SIGINT during step 4
            self._raised = True
            signal.raise_signal(signal.SIGINT)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_at_step_3)
    assert train(options(tmp_path / "broken"), quiet=True)["interrupted"]
    monkeypatch.setattr(Trainer, "micro_batch", original)
    train(options(tmp_path / "broken", resume=True), quiet=True)

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]
    assert len(losses("straight")) == 6 and losses("broken") == pytest.approx(losses("straight"), abs=1e-6)


def bad_reward_module(tmp_path):
    (tmp_path / "bad_rewards.py").write_text(
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(prompts)\n"
        "def word(prompts, completions, **kw):\n    return ['good'] * len(prompts)\n")
    return tmp_path / "bad_rewards.py"


@pytest.mark.parametrize("case,says", [
    ("missing", "match no layout it accepts (paired: prompt / chosen / rejected; implicit: chosen / rejected)"),
    ("no-module", "cannot import 'no_such_module'"), ("short", "returned 1 values for 2 completions"),
    ("nan", "returned nan for completion 0"), ("word", "returned 'good' (str)"),
    ("group", "--num-generations must be at least 2"), ("beta", "--beta must be > 0"),
    ("long", "leave no room to generate within --seq-len 8"), ("smoothing", "--label-smoothing applies to --loss robust")])
def test_bad_input_is_refused_before_the_first_step(causal_dir, tmp_path, capsys, case, says):
    data = layouts(tmp_path)
    module = bad_reward_module(tmp_path)
    task, extra = {
        "missing": ("dpo", ["--data", write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}] * 20)]),
        "no-module": ("grpo", ["--reward", "no_such_module:fn"]),
        "short": ("grpo", ["--reward", f"{module}:short"]), "nan": ("grpo", ["--reward", f"{module}:nan"]),
        "word": ("grpo", ["--reward", f"{module}:word"]), "group": ("grpo", ["--num-generations", "1"]),
        "beta": ("dpo", ["--beta", "-0.1"]), "smoothing": ("dpo", ["--label-smoothing", "0.1"]),
        "long": ("grpo", ["--seq-len", "8", "--max-completion-length", "4"]),
    }[case]
    if "--data" not in extra:
        extra = ["--data", data[task], *extra]
    output = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--task", task, "--model", causal_dir, "--output", output, *SMALL[:8], *extra)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [
    ("dpo", ["--qlora"]), ("dpo", ["--use-dora", "--grad-checkpointing"]), ("kto", ["--optim", "adamw8bit"]),
    ("grpo", ["--qlora", "--grad-checkpointing", "--num-generations", "2", "--max-completion-length", "4"]),
    ("grpo", ["--use-dora", "--num-generations", "2", "--max-completion-length", "4", "--num-iterations", "2"])])
def test_recipes_work_with_these_tasks(causal_dir, tmp_path, capsys, task, extra):
    data = layouts(tmp_path)[task]
    code, out, err = run_cli(capsys, "train", "--task", task, "--model", causal_dir, "--data", data,
                             "--output", tmp_path / "run", *SMALL, *extra, "--json")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(abs(v) < 1e6 for v in losses)


@pytest.mark.slow
def test_two_process_ddp_dpo_equals_one_process_with_the_same_global_batch(causal_dir, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    import lorakit as lk

    data = layouts(tmp_path)["dpo"]
    flags = ["--task", "dpo", "--model", causal_dir, "--data", str(data), "--max-steps", "4", "--seq-len", "32",
             "--lr", "1e-2", "--warmup-steps", "1", "--dropout", "0", "--eval-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lorakit", "train", *flags, "--batch-size", "2", "--output", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "lorakit", "train", *flags, "--batch-size", "4", "--output",
                             str(tmp_path / "single")], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]
    assert losses("ddp") == pytest.approx(losses("single"), abs=1e-4)
    a, b = lk.read_adapter(tmp_path / "ddp" / "adapter")[1], lk.read_adapter(tmp_path / "single" / "adapter")[1]
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_grpo_writes_its_rollout_figures_to_tensorboard(causal_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = layouts(tmp_path)["grpo"]
    code, _, err = run_cli(capsys, "train", "--task", "grpo", "--model", causal_dir, "--data", data, "--output",
                           tmp_path / "run", *SMALL, "--num-generations", "2", "--max-completion-length", "4",
                           "--report-to", "tensorboard")
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward", "train/reward_std", "train/kl", "train/completions/mean_length",
            "train/rollout_tokens_per_s", "eval/reward"} <= tags
    logged = [json.loads(line)["reward"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
              if "reward" in json.loads(line)]
    assert [e.value for e in events.Scalars("train/reward")] == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_a_yaml_job_file_sets_the_grpo_options(causal_dir, tmp_path, capsys):
    data = layouts(tmp_path)["grpo"]
    job = tmp_path / "job.yaml"
    job.write_text(f"task: grpo\nmodel: {causal_dir}\ndata: {data}\nnum-generations: 2\nmax-completion-length: 3\n"
                   "rewards: [answer_match, length=0.5]\nbeta: 0.04\n")
    code, out, err = run_cli(capsys, "train", job, "--output", tmp_path / "run", *SMALL, "--json")
    assert code == 0, err
    record = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()][0]
    assert {"rewards/answer_match", "rewards/length"} <= set(record) and record["completions/mean_length"] <= 3
    assert record["reward"] == pytest.approx(record["rewards/answer_match"] + 0.5 * record["rewards/length"], abs=1e-5)
