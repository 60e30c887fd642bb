"""NEFTune against transformers' own hook, weighted data mixtures, and their bad input."""

import json

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.training.data import load_splits, mixture_parts
from lorakit.training.loop import train
from lorakit.training.neftune import add_neftune
from lorakit.training.options import resolve_options
from tests.helpers import tiny_llama


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_neftune_noise_is_transformers_noise_and_only_in_training():
    from transformers.integrations.neftune import activate_neftune

    model, ids = tiny_llama(), torch.randint(0, 100, (2, 7))
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids)
    handle = add_neftune(model, 5.0)
    model.train()
    torch.manual_seed(3)
    ours = embeddings(ids)
    handle.remove()
    theirs_handle = activate_neftune(model, 5.0)
    torch.manual_seed(3)
    theirs = embeddings(ids)
    theirs_handle.remove()
    assert torch.equal(ours, theirs) and not torch.equal(ours, clean)
    bound = 5.0 / (7 * clean.shape[-1]) ** 0.5
    assert (ours - clean).abs().max() <= bound * (1 + 1e-6)
    add_neftune(model, 5.0)
    model.eval()
    assert torch.equal(embeddings(ids), clean)


def test_a_neftune_run_trains_with_noise_and_leaves_the_model_clean(causal_dir, sft_jsonl, tmp_path):
    def run(name, **extra):
        train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(tmp_path / name),
                                         max_steps=3, batch_size=4, seq_len=32, warmup_steps=1, dropout=0.0, **extra)),
              quiet=True)
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"lr"' in line]

    plain, noisy = run("plain"), run("noisy", neftune_noise_alpha=5.0)
    assert noisy[0] != plain[0] and noisy[0] == pytest.approx(plain[0], rel=0.05)
    with pytest.raises(ConfigError, match="--neftune-noise-alpha must be > 0"):
        resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", neftune_noise_alpha=0))


def test_a_mixture_draws_the_train_split_in_its_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}", "label": "x"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}", "label": "y"} for i in range(50)])
    assert mixture_parts(f"{a}:0.6 {b}:0.4") == [(a, 0.6), (b, 0.4)] and mixture_parts(a) is None
    splits = load_splits(f"{a}:0.6 {b}:0.4", seed=1)
    own = {name: load_splits(path, seed=1) for name, path in (("a", a), ("b", b))}
    train_a = [r for r in splits["train"] if r["text"].startswith("a")]
    train_b = [r for r in splits["train"] if r["text"].startswith("b")]
    total = len(own["a"]["train"]) + len(own["b"]["train"])  # 80 + 40
    assert len(splits["train"]) == total and len(train_a) == round(0.6 * total) and len(train_b) == round(0.4 * total)
    assert len({r["text"] for r in train_a}) == len(train_a)  # a has rows enough: no repeats
    assert {r["text"] for r in train_b} == {r["text"] for r in own["b"]["train"]}  # b is repeated past its 40
    assert splits["validation"] == own["a"]["validation"] + own["b"]["validation"]
    assert splits["train"] == load_splits(f"{a}:0.6 {b}:0.4", seed=1)["train"]  # reproducible


def test_bad_mixtures_are_refused_before_training(causal_dir, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}] * 10)
    for data, message in ((f"{a}:0.7 {a}:0", "the weight of .*a.jsonl is 0; mixture weights must be > 0"),
                          (f"{a}:1 {tmp_path}/missing.jsonl:1", "the mixture part .*missing.jsonl does not exist")):
        with pytest.raises(ConfigError, match=message):
            resolve_options(None, dict(model=causal_dir, data=data, task="sft", output=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_the_cli_takes_a_mixture_as_separate_words(causal_dir, tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli.training import options_from

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}] * 10)
    args = build_parser().parse_args(["train", "--model", causal_dir, "--task", "sft", "--data", f"{a}:0.7", f"{a}:0.3"])
    assert options_from(args).data == f"{a}:0.7 {a}:0.3"
