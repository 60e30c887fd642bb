"""The objectives' own behaviour: the reference policy really is the adapter switched off (or the
starting adapter's frozen copy), rollouts are reproducible, advantages follow TRL, and a DPO step
keeps no more activations than an SFT step on the same two sequences (no second model)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.kernels.logprobs import gathered_logprobs, shifted_targets, token_logprobs
from lorakit.kernels.losses import causal_lm_loss
from lorakit.training.objectives.base import segment_sums
from lorakit.training.objectives.losses import group_advantages
from tests.helpers import randomize_lora
from tests.training.objectives.test_trl_parity import pair_rows
from tests.training.objectives.trl_reference import TARGETS, collate_pairs, objective, stand_in_trainer


def adapted(causal_dir, seed=7, attention="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(causal_dir, attn_implementation=attention)
    lk.inject(model, lk.LoraConfig(r=4, lora_dropout=0.0, target_modules=TARGETS))
    return randomize_lora(model, scale=0.3, seed=seed)


def test_reference_pass_runs_with_the_adapter_off(causal_dir):
    model = adapted(causal_dir)
    task, _ = objective(causal_dir, task="dpo")
    trainer = stand_in_trainer(model)
    batch = task.batch(trainer, task.encode(pair_rows(), "train"))
    reference = task.reference_logps(trainer, batch)
    base = AutoModelForCausalLM.from_pretrained(causal_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["positions"], batch["targets"])
    with torch.no_grad():
        expected = gathered_logprobs(base, *args, position_ids=batch["position_ids"])
        policy = gathered_logprobs(model, *args, position_ids=batch["position_ids"])
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert (reference - policy).abs().max() > 1e-2
    assert lk.active_adapters(model) == ["default"]  # switched back on after the block


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask, and an additive one
def test_shared_prompt_rows_score_each_completion_as_if_alone(causal_dir, attention):
    """The prompt once, then each completion: every token's log-probability equals the one it gets
    in its own, separately padded sequence."""
    model = adapted(causal_dir, attention=attention)
    task, _ = objective(causal_dir, task="dpo")
    examples = task.encode(pair_rows(), "train")
    shared = segment_sums(task.logps(stand_in_trainer(model), task.batch(stand_in_trainer(model), examples), False),
                          task.batch(stand_in_trainer(model), examples))
    alone = collate_pairs(examples, task.pad_id)
    targets = shifted_targets(alone["input_ids"], alone["completion_mask"])
    with torch.no_grad():
        expected = token_logprobs(model, alone["input_ids"], alone["attention_mask"], targets).sum(1)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)


def test_a_starting_adapter_is_its_own_frozen_reference(causal_dir, tmp_path):
    """--adapter: the trained copy moves, the "ref" copy stays where the run started (TRL's "ref")."""
    from lorakit.training.setup import prepare_model

    start = adapted(causal_dir)
    lk.save_adapter(start, tmp_path / "sft")
    task, _ = objective(causal_dir, task="dpo", adapter=str(tmp_path / "sft"))
    model = prepare_model(AutoModelForCausalLM.from_pretrained(causal_dir), task.options)
    assert sorted(lk.list_adapters(model)) == ["default", "ref"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    examples = task.encode(pair_rows(), "train")
    trainer = stand_in_trainer(model)
    loss, _, logs = task._loss(trainer, examples, grad=True)
    assert logs["rewards/margins"] == 0  # policy == reference at the start
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-50.0)
    _, _, logs = task._loss(trainer, examples, grad=False)
    assert logs["rewards/margins"] > 0


def test_group_advantages_follow_trl():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, float("nan"), 0.0, 3.0])
    grouped = rewards.view(-1, 2)
    mean = torch.nanmean(grouped, 1).repeat_interleave(2)
    for scale in ("group", "batch", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(2) if scale == "group" else nanstd(rewards).expand_as(rewards)
        expected = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
        torch.testing.assert_close(group_advantages(rewards, 2, scale), torch.nan_to_num(expected, nan=0.0))


@pytest.mark.slow
def test_rollouts_are_reproducible_and_use_the_live_adapter(causal_dir):
    from lorakit.serving.engine import Engine
    from lorakit.serving.requests import Limits

    model = adapted(causal_dir)
    task, tokenizer = objective(causal_dir, task="grpo", num_generations=2, max_completion_length=6)
    task.engine = Engine(model, tokenizer, limits=Limits(max_new_tokens=6, max_batch=8))
    try:
        prompts = [e["prompt_ids"] for e in task.encode([{"prompt": "the film was good"}, {"prompt": "a movie is"}], "x")]
        prompts = [p for p in prompts for _ in range(3)]
        draw = lambda seeds: [o["token_ids"] for o in task.sample(model, prompts, seeds, 1.0, 1.0, 6)]  # noqa: E731
        first, again = draw(list(range(6))), draw(list(range(6)))
        assert first == again
        assert draw(list(range(100, 106))) != first
        greedy = task.sample(model, prompts[:1], [None], 0.0, 1.0, 6)[0]["token_ids"]
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert greedy == expected[:len(greedy)]  # the engine decodes with the adapter the optimizer trains
        with lk.disable_adapters(model), torch.no_grad():
            plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert plain != expected
    finally:
        task.engine.close()


def _saved_bytes(step) -> int:
    """Bytes of every tensor autograd keeps for backward during ``step()``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def test_a_dpo_step_keeps_no_more_than_an_sft_step_on_the_same_sequences(causal_dir):
    model = adapted(causal_dir)
    task, _ = objective(causal_dir, task="dpo")
    examples = task.encode(pair_rows(), "train")
    batch = collate_pairs(examples, task.pad_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    parameters = sum(p.numel() for p in model.parameters())
    dpo = _saved_bytes(lambda: task._loss(stand_in_trainer(model), examples, grad=True)[0].backward())
    sft = _saved_bytes(lambda: causal_lm_loss(model, batch["input_ids"], labels, batch["attention_mask"]).backward())
    assert sum(p.numel() for p in model.parameters()) == parameters  # no second model
    assert dpo <= 1.15 * sft, (dpo, sft)


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_precomputed_references_give_the_loss_of_the_reference_pass(causal_dir, task):

    model = adapted(causal_dir)
    if task == "dpo":
        rows = pair_rows()
    else:
        rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
                for i, r in enumerate(pair_rows())]
    live, _ = objective(causal_dir, task=task)
    stored, _ = objective(causal_dir, task=task, precompute_ref=True)
    trainer = stand_in_trainer(model)
    examples = stored.encode(rows, "train")
    trainer.encoded = {"train": examples}
    stored.prepare(trainer)
    assert any(k.startswith("ref_") for k in examples[0])
    expected, _, _ = live._loss(trainer, live.encode(rows, "train"), grad=False)
    got, _, _ = stored._loss(trainer, examples, grad=False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
