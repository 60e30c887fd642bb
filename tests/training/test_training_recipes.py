"""Training recipes: optimizers, schedules, a head learning rate, gradient checkpointing (its loss and
gradients: tests/kernels/test_kernels.py), TensorBoard, torch.compile."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.training.loop import train
from lorakit.training.optim import OPTIMIZERS, build_optimizer, optimizer_state_bytes, param_groups
from lorakit.training.options import resolve_options
from tests.helpers import tiny_bert, tiny_llama, train_options


def log(output):
    entries = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [e for e in entries if "lr" in e]  # the training steps (evaluations log other keys)


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_trains(optim, classifier_dir, reviews_csv, tmp_path):
    """A run with each optimizer takes its steps and moves every adapter matrix off its start (B starts
    at zero); on one fixed batch, ten steps of the same optimizer lower the loss by a clear margin."""
    summary = train(train_options(classifier_dir, reviews_csv, tmp_path / optim, optim=optim), quiet=True)
    assert summary["steps"] == 6 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log(tmp_path / optim))
    tensors = load_file(tmp_path / optim / "adapter" / "adapter_model.safetensors")
    B = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert B and all(b.abs().sum() > 0 for b in B)

    model = tiny_bert(seed=3)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    lr = 0.3 if optim == "sgd" else 1e-2  # plain SGD needs a larger step to move as far in ten steps
    optimizer = build_optimizer(model, resolve_options(None, dict(optim=optim, lr=lr)))
    generator = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, 90, (8, 12), generator=generator), torch.randint(0, 2, (8,), generator=generator)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.95 * losses[0], losses


def test_adamw8bit_keeps_8_bit_moments():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    sizes = {}
    for optim in ("adamw", "adamw8bit"):
        opts = resolve_options(None, dict(optim=optim, lr=1e-3))
        optimizer = build_optimizer(model, opts)
        model(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        sizes[optim] = optimizer_state_bytes(optimizer)
    assert sizes["adamw8bit"] <= 0.3 * sizes["adamw"]


def test_adamw8bit_quantizes_small_lora_factors_too():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    optimizer = build_optimizer(model, resolve_options(None, dict(optim="adamw8bit", lr=1e-3, task="sft")))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    moments = [state["state1"] for state in optimizer.state.values()]
    assert moments and all(m.dtype == torch.uint8 for m in moments)  # 2 x 16 factors: far under 4,096


def test_bad_recipe_options_are_named(classifier_dir, reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match="unknown --optim 'adam'; choose one of adamw, adamw8bit, sgd, adafactor"):
        train_options(classifier_dir, reviews_csv, tmp_path / "a", optim="adam")
    with pytest.raises(ConfigError, match="unknown --lr-scheduler 'step'"):
        train_options(classifier_dir, reviews_csv, tmp_path / "a", lr_scheduler="step")
    with pytest.raises(ConfigError, match="--warmup-ratio must be in"):
        train_options(classifier_dir, reviews_csv, tmp_path / "a", warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="unknown --report-to tracker 'comet'; known: tensorboard, mlflow, wandb"):
        train_options(classifier_dir, reviews_csv, tmp_path / "a", report_to="tensorboard,comet")
    with pytest.raises(ConfigError, match="with --full everything is trained in full"):
        train_options(classifier_dir, reviews_csv, tmp_path / "a", head_lr=1e-3, full=True)


def test_head_lr_puts_the_head_in_its_own_group_and_needs_one():
    model = lk.inject(tiny_bert(), lk.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    groups = param_groups(model, resolve_options(None, dict(lr=1e-3, head_lr=1e-2)))
    head = [g for g in groups if g["lr"] == 1e-2]
    assert len(groups) == 2 and len(head) == 1
    assert {id(p) for p in head[0]["params"]} == {id(p) for p in model.classifier.modules_to_save["default"].parameters()}
    plain = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="this run trains none"):
        param_groups(plain, resolve_options(None, dict(lr=1e-3, head_lr=1e-2, task="sft")))


def test_warmup_ratio_and_cosine_schedule(classifier_dir, reviews_csv, tmp_path):
    train(train_options(classifier_dir, reviews_csv, tmp_path / "run", max_steps=10, lr=1e-2, warmup_ratio=0.2,
                  lr_scheduler="cosine"), quiet=True)
    lrs = [e["lr"] for e in log(tmp_path / "run")]
    assert lrs[0] == pytest.approx(1e-2 / 2) and lrs[1] == pytest.approx(1e-2)  # 2 warmup steps
    assert lrs[5] == pytest.approx(1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))


def test_grad_checkpointing_run_and_tensorboard_scalars(causal_dir, sft_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(out), max_steps=6,
                                     batch_size=4, seq_len=32, warmup_steps=1, eval_steps=3, grad_checkpointing=True,
                                     report_to="tensorboard")), quiet=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([e["loss"] for e in log(out)], rel=1e-5)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]


@pytest.mark.slow
def test_compiled_run_follows_the_eager_loss_curve(causal_dir, sft_jsonl, tmp_path):
    # a model without dropout: compiled code draws random numbers differently
    for name, compiled in (("eager", False), ("compiled", True)):
        train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(tmp_path / name),
                                         max_steps=3, batch_size=4, seq_len=32, warmup_steps=1, dropout=0.0,
                                         compile=compiled)), quiet=True)
    eager, compiled = ([e["loss"] for e in log(tmp_path / n)] for n in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_a_causal_run_reports_its_peak_beside_the_estimate(causal_dir, sft_jsonl, tmp_path):
    summary = train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(tmp_path / "r"),
                                               max_steps=2, batch_size=4, seq_len=32, warmup_steps=1)), quiet=True)
    memory = summary["memory"]
    assert memory["peak_bytes"] > 0 and memory["estimate_bytes"] > 0


def test_principal_inits_and_loraplus_at_the_lora_lr_get_a_warning(classifier_dir, reviews_csv, tmp_path):
    with pytest.warns(UserWarning, match="pass a lower --lr, e.g. 2e-4"):
        resolve_options(None, dict(model=classifier_dir, data=reviews_csv, init="pissa"))
    with pytest.warns(UserWarning, match="pass a lower --lr"):
        resolve_options(None, dict(model=classifier_dir, data=reviews_csv, loraplus_ratio=16.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_options(None, dict(model=classifier_dir, data=reviews_csv, init="pissa", lr=2e-4))
