"""--packing: examples share a row but not their attention; each example's loss is what it is alone."""

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.training.loop import train
from lorakit.training.options import resolve_options
from lorakit.training.packing import collate_packed, pack_examples
from tests.helpers import VOCAB, tiny_llama


def example(length, prompt, seed):
    ids = torch.randint(2, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def token_losses(model, batch):
    """Per-token losses of next-token prediction, -100 targets dropped."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses[targets.reshape(-1) != -100]


def test_packed_examples_give_each_example_its_own_loss():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    examples = [example(7, 3, 1), example(12, 5, 2), example(5, 0, 3), example(9, 4, 4)]
    rows = pack_examples(examples, seq_len=24)
    assert [len(r["input_ids"]) for r in rows] == [24, 9]  # 7+12+5 | 9: in order, at most 24 per row
    packed = token_losses(model, collate_packed(rows, pad_id=1))
    alone = torch.cat([token_losses(model, {"input_ids": torch.tensor([e["input_ids"]]),
                                            "labels": torch.tensor([e["labels"]])}) for e in examples])
    assert packed.shape == alone.shape and torch.allclose(packed, alone, atol=1e-5)
    # without the restarts the examples would see each other: the test can tell
    leaky = collate_packed(rows, pad_id=1)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).repeat(2, 1)
    assert not torch.allclose(token_losses(model, leaky), alone, atol=1e-3)


def test_packing_run_and_its_bad_input(causal_dir, sft_jsonl, reviews_csv, classifier_dir, tmp_path):
    summary = train(resolve_options(None, dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(tmp_path / "r"),
                                               max_steps=4, batch_size=2, seq_len=64, warmup_steps=1, packing=True)),
                    quiet=True)
    assert summary["steps"] == 4
    with pytest.raises(lk.ConfigError, match="drop --packing"):
        resolve_options(None, dict(model=classifier_dir, data=reviews_csv, task="classify", packing=True))
