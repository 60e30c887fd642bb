"""torchrun with 2 CPU processes (gloo): DDP must give the run a single process gives with the same
global batch, and only rank 0 may write."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lorakit as lk
from lorakit.training.loop import train
from lorakit.training.options import resolve_options

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

COMMON = dict(max_steps=6, seq_len=32, lr=1e-2, warmup_steps=1, dropout=0.0, targets="all-linear", eval_steps=3)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(classifier_dir, reviews_csv, tmp_path):
    # the base model's own dropout draws different random numbers per process: switch it off
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(classifier_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    classifier_dir = str(tmp_path / "no-dropout")
    model.save_pretrained(classifier_dir)
    AutoTokenizer.from_pretrained(model.name_or_path).save_pretrained(classifier_dir)
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lorakit", "train", "--model", classifier_dir, "--data", reviews_csv, "--output", str(ddp_out),
               "--batch-size", "4", "--max-steps", "6", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "1",
               "--dropout", "0", "--targets", "all-linear", "--eval-steps", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"output"') == 1  # only rank 0 prints its summary

    single = tmp_path / "single"
    train(resolve_options(None, dict(model=classifier_dir, data=reviews_csv, output=str(single), batch_size=8,
                                     **COMMON)), quiet=True)
    losses = [[json.loads(line).get("loss") for line in (out / "train_log.jsonl").read_text().splitlines()]
              for out in (ddp_out, single)]
    assert len(losses[0]) == len(losses[1])
    for a, b in zip(*losses):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4)
    ddp_tensors, single_tensors = lk.read_adapter(ddp_out / "adapter")[1], lk.read_adapter(single / "adapter")[1]
    for key, value in single_tensors.items():
        torch.testing.assert_close(ddp_tensors[key], value, atol=1e-4, rtol=1e-3)
    assert not [p for p in ddp_out.iterdir() if p.name.startswith(".")]  # no stray staging directories


def test_two_process_ddp_trains_a_causal_lm_through_the_chunked_loss(causal_dir, text_file, tmp_path):
    """lm task: DDP wraps the chunked-loss module; packed rows have equal token counts per process,
    so the averaged gradients equal one process's over the global batch."""
    ddp_out, single = tmp_path / "ddp", tmp_path / "single"
    flags = dict(task="lm", max_steps=4, seq_len=16, lr=1e-2, warmup_steps=1, dropout=0.0, targets="all-linear",
                 eval_steps=4)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit",
               "train", "--model", causal_dir, "--data", text_file, "--output", str(ddp_out), "--batch-size", "2",
               *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(resolve_options(None, dict(model=causal_dir, data=text_file, output=str(single), batch_size=4, **flags)),
          quiet=True)
    losses = [[json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for out in (ddp_out, single)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert all(abs(a - b) < 1e-4 for a, b in zip(*losses)), losses
    ddp_tensors, single_tensors = lk.read_adapter(ddp_out / "adapter")[1], lk.read_adapter(single / "adapter")[1]
    for key, value in single_tensors.items():
        torch.testing.assert_close(ddp_tensors[key], value, atol=1e-4, rtol=1e-3)
