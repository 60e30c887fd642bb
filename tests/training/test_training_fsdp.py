"""torchrun with 2 CPU processes (gloo) and --fsdp: FSDP2 shards the base and the adapters, and the
run must equal one process with the same global batch (losses, adapter), resume exactly, and write
its files once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.training.loop import train
from lorakit.training.options import resolve_options

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

REPO = str(Path(lk.__file__).resolve().parents[1])
FLAGS = dict(task="lm", max_steps=4, seq_len=16, lr=1e-2, warmup_steps=1, dropout=0.0, targets="all-linear", max_grad_norm=0.05,
             eval_steps=2)


def torchrun(causal_dir, text_file, output, *extra, **flags):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit",
               "train", "--model", causal_dir, "--data", text_file, "--output", str(output), "--batch-size", "2",
               "--fsdp", *[f"--{k.replace('_', '-')}={v}" for k, v in {**FLAGS, **flags}.items()], *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(output):
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32-base", "qlora-base"])
def test_fsdp_equals_one_process_with_the_same_global_batch(qlora, causal_dir, text_file, tmp_path):
    """Gradient checkpointing on; with QLoRA the 4-bit codes are sharded parameters too."""
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    done = torchrun(causal_dir, text_file, fsdp, "--json", "--grad-checkpointing", *(["--qlora"] if qlora else []))
    assert done.stdout.count('"output"') == 1  # only rank 0 prints its summary
    train(resolve_options(None, dict(model=causal_dir, data=text_file, output=str(single), batch_size=4, qlora=qlora,
                                     **FLAGS)), quiet=True)
    assert len(losses(fsdp)) == len(losses(single)) == 4
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses(fsdp), losses(single))), (losses(fsdp), losses(single))
    sharded, whole = lk.read_adapter(fsdp / "adapter")[1], lk.read_adapter(single / "adapter")[1]
    assert sharded.keys() == whole.keys()
    for key, value in whole.items():
        torch.testing.assert_close(sharded[key], value, atol=1e-4, rtol=1e-3)
    assert not [p for p in fsdp.iterdir() if p.name.startswith(".")]  # no stray staging directories
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["test"] is not None and summary["artifact"].endswith("adapter")


INTERRUPTED_RUN = """
import signal, sys
from lorakit.training.loop import Trainer, train
from lorakit.training.options import resolve_options

original = Trainer.micro_batch

def interrupt_during_step_3(self, micro):
    if micro == 2:  # every process gets a real SIGINT during step 3, as from Ctrl-C in the terminal
        signal.raise_signal(signal.SIGINT)
    return original(self, micro)

Trainer.micro_batch = interrupt_during_step_3
result = train(resolve_options(None, dict(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], batch_size=2,
                                           fsdp=True, **{FLAGS})), quiet=True)
assert result["interrupted"] and result["step"] == 3, result
"""


def test_fsdp_resumes_onto_the_same_curve(causal_dir, text_file, tmp_path):
    """The checkpoint holds the whole trainable state and the optimizer state gathered from the
    shards; resuming scatters them back and continues on the uninterrupted run's curve."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    flags = dict(FLAGS, max_steps=6, eval_steps=6)
    torchrun(causal_dir, text_file, straight, **flags)
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_RUN.replace("{FLAGS}", repr(flags)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), causal_dir, text_file, str(broken)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (broken / "adapter").exists() and (broken / "checkpoint" / "trainable.safetensors").is_file()
    torchrun(causal_dir, text_file, broken, "--resume", **flags)
    assert losses(broken) == pytest.approx(losses(straight), abs=1e-6)
    a, b = lk.read_adapter(straight / "adapter")[1], lk.read_adapter(broken / "adapter")[1]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_fsdp_without_torchrun_says_how_to_launch(causal_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        resolve_options(None, dict(model=causal_dir, data=text_file, output=str(tmp_path / "x"), fsdp=True))


SHARDS_ONLY_RUN = """
import sys
import transformers
from torch.distributed.tensor import DTensor
from lorakit.training.loop import Trainer
from lorakit.training.options import resolve_options

def refuse(*args, **kwargs):
    raise AssertionError("the whole model was loaded")
transformers.AutoModelForCausalLM.from_pretrained = refuse
trainer = Trainer(resolve_options(None, dict(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], batch_size=2,
                                             fsdp=True, qlora=sys.argv[4] == "qlora", **{FLAGS})), quiet=True)
assert trainer.checkpoint is not None
for name, param in trainer.model.named_parameters():  # every weight split in two, this process holding its half
    assert isinstance(param, DTensor) and param.to_local().numel() <= -(-param.numel() // 2), name
trainer.run()
"""


@pytest.mark.parametrize("base", ["fp32", "qlora"])
def test_each_fsdp_process_reads_only_its_own_shards(base, causal_dir, text_file, tmp_path):
    """The model is built on the meta device in every process and never loaded whole (from_pretrained
    refuses here); each process holds half of each weight, and the run equals the usual one's (the
    test above runs this path too)."""
    script = tmp_path / "shards_only.py"
    script.write_text(SHARDS_ONLY_RUN.replace("{FLAGS}", repr(FLAGS)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), causal_dir, text_file, str(tmp_path / "run"), base], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
