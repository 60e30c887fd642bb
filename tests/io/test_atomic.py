"""All-or-nothing writes under kill -9 at every file-system step (lorakit/io/atomic.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import lorakit as lk
from lorakit.io.atomic import staged_file
from tests.helpers import tiny_llama

# the writer runs in a child that SIGKILLs itself just before its N-th call of any of these steps
KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    import lorakit.io.atomic as atomic, lorakit.io.checkpoint as checkpoint
    calls, stop_at = [0], int(sys.argv[1])
    def deadly(function):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == stop_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return step
    os.replace, os.rename, os.link = deadly(os.replace), deadly(os.rename), deadly(os.link)
    shutil.rmtree = deadly(shutil.rmtree)
    if hasattr(atomic, "exchange"):  # the one-step swap
        atomic.exchange = deadly(atomic.exchange)
    checkpoint.save_file = deadly(checkpoint.save_file)
""")


# one child process prepares two adapters, then forks a writer per kill point and checks after each
# kill that the directory holds the old adapter or the new one (bench: benchmarks/reliability.py)
SAVE_OVER = KILLER + textwrap.dedent("""
    import json, torch, lorakit as lk
    from transformers import LlamaConfig, LlamaForCausalLM
    target = sys.argv[2]
    def adapter(alpha):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = lk.inject(LlamaForCausalLM(cfg), lk.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj"]))
        with torch.no_grad():  # the weights record which save they belong to
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(alpha)
        return model
    def state():
        try:
            config, tensors = lk.read_adapter(target)
        except lk.LoraError:
            return None
        values = sorted({float(t.flatten()[0]) for k, t in tensors.items() if "lora_B" in k})
        return [config.lora_alpha, values]
    old, new = adapter(16), adapter(64)
    outcomes = []
    for point in range(1, 100):
        stop_at, calls[0] = point, -10**9  # the parent's own steps never count
        lk.save_adapter(old, target)
        open(os.path.join(target, "tokenizer.json"), "w").write("{}")  # other files survive the swap
        child = os.fork()
        if child == 0:
            calls[0] = 0
            lk.save_adapter(new, target)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        killed = os.WIFSIGNALED(status)
        outcomes.append({"point": point, "killed": killed, "state": state(),
                         "tokenizer": open(os.path.join(target, "tokenizer.json")).read()})
        if not killed:
            break
    print(json.dumps(outcomes))
""")


@pytest.mark.slow
def test_saving_over_an_adapter_is_all_or_nothing_under_kill_at_every_step(tmp_path):
    """Before: two renames; a kill between them left the new weights with the old config."""
    target = tmp_path / "adapter"
    run = subprocess.run([sys.executable, "-c", SAVE_OVER, "0", str(target)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(outcomes) >= 4 and not outcomes[-1]["killed"]  # several kill points, then a whole save
    for outcome in outcomes:
        assert outcome["state"] in ([16, [16.0]], [64, [64.0]]), outcome  # the old adapter or the new
        assert outcome["tokenizer"] == "{}"
    assert outcomes[-1]["state"] == [64, [64.0]]
    lk.save_adapter(lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"])), target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # the next save removed what killed writers left


@pytest.mark.slow
def test_a_killed_file_write_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "best.safetensors"
    script = KILLER + textwrap.dedent(f"""
        from lorakit.io.atomic import staged_file
        with staged_file({str(target)!r}) as tmp:
            open(tmp, "w").write("half")
            os.replace(tmp, tmp)  # the kill lands here, with the temporary file written
    """)
    assert subprocess.run([sys.executable, "-c", script, "1"]).returncode == -9
    assert len(os.listdir(tmp_path)) == 1 and not target.exists()  # a leftover, never the target
    with staged_file(target) as tmp:
        open(tmp, "w").write("whole")
    assert os.listdir(tmp_path) == [target.name] and target.read_text() == "whole"


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_replaces_nothing(tmp_path):
    """RLIMIT_FSIZE makes writes fail with EFBIG as a full disk fails them with ENOSPC."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapter_config.json").read_text()
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch, lorakit as lk
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        model = lk.inject(LlamaForCausalLM(cfg), lk.LoraConfig(r=8, lora_alpha=99, target_modules=["q_proj", "v_proj"]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            lk.save_adapter(model, {str(tmp_path / "ad")!r})
        except lk.LoraError as exc:
            print(exc)
            sys.exit(3)
        try:
            torch.save(torch.zeros(10000), {str(tmp_path / "x.pt")!r})
        except RuntimeError as exc:
            from lorakit.io.atomic import write_failure
            print(write_failure(exc, {str(tmp_path / "x.pt")!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"could not write {tmp_path / 'ad'}" in run.stdout and "free some space" in run.stdout
    assert (tmp_path / "ad" / "adapter_config.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_new_adapter_follows_the_models_mode(mode, tmp_path, ids):
    """PEFT loads an adapter for inference in eval mode: LoRA dropout must be off in an eval model."""
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    fresh = getattr(tiny_llama(), mode)()
    lk.load_adapter(fresh, tmp_path / "ad")
    lk.load_adapter(fresh, tmp_path / "ad", adapter_name="second")  # into a layer that exists already
    layers = [m for m in fresh.modules() if isinstance(m, lk.LoraLayer)]
    assert layers and all(m.training == (mode == "train") for layer in layers for m in layer.modules())
    if mode == "eval":
        import torch

        with torch.no_grad():
            for name, p in fresh.named_parameters():
                if "lora_B" in name:
                    p.normal_()
            assert torch.equal(fresh(ids).logits, fresh(ids).logits)  # no dropout at inference
