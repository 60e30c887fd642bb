"""Loss and gradients equal TRL's on the same batch (fp32, a tiny random Llama, atol 1e-5): every
DPO loss type, SimPO (TRL's CPO), ORPO, KTO and GRPO."""


import pytest
import torch

from tests.helpers import review_rows
from tests.training.objectives.trl_reference import (
    lora_grads,
    lorakit_twin,
    objective,
    stand_in_trainer,
    trl_args,
    trl_trainer,
)

ATOL = 1e-5


def pair_rows(n=4, chat=True):
    rows = []
    for r in review_rows(n):
        other = "negative" if r["label"] == "positive" else "positive"
        if chat:
            rows.append({"prompt": [{"role": "user", "content": r["text"]}],
                         "chosen": [{"role": "assistant", "content": f"very {r['label']}"}],
                         "rejected": [{"role": "assistant", "content": other}]})
        else:
            rows.append({"prompt": r["text"] + " :", "chosen": " " + r["label"], "rejected": " really " + other})
    return rows


def assert_same(ours_loss, ours_model, theirs_loss, theirs_model):
    torch.testing.assert_close(ours_loss.detach(), theirs_loss.detach().float(), atol=ATOL, rtol=1e-5)
    ours, theirs = lora_grads(ours_model, strip=""), lora_grads(theirs_model)
    assert ours and set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in ours.values())


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,smoothing,chat", [("sigmoid", 0.0, True), ("ipo", 0.0, True), ("hinge", 0.0, False),
                                                      ("robust", 0.2, True)])
def test_dpo_losses_equal_trl(causal_dir, tmp_path, loss_type, smoothing, chat):
    from trl import DPOConfig, DPOTrainer

    rows = pair_rows(chat=chat)
    args = trl_args(DPOConfig, tmp_path, beta=0.3, loss_type=[loss_type], label_smoothing=smoothing, max_length=64)
    trainer = trl_trainer(DPOTrainer, args, causal_dir, rows)
    encoded = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(encoded))
    theirs.backward()

    ours_model = lorakit_twin(causal_dir, trainer.model, tmp_path)
    task, _ = objective(causal_dir, task="dpo", loss_type=loss_type, beta=0.3, label_smoothing=smoothing)
    examples = task.encode(rows, "train")
    assert [e["prompt_ids"] for e in examples] == [e["prompt_ids"] for e in encoded]
    assert [e["chosen_ids"] for e in examples] == [e["chosen_ids"] for e in encoded]
    assert [e["rejected_ids"] for e in examples] == [e["rejected_ids"] for e in encoded]
    loss, _, logs = task._loss(stand_in_trainer(ours_model), examples, grad=True)
    loss.backward()
    assert_same(loss, ours_model, theirs, trainer.model)
    assert logs["rewards/margins"] != 0  # the reference really differs from the policy


def _from_trl_pairs(encoded):
    """TRL's ORPO / CPO rows (prompt_input_ids, chosen_input_ids = prompt + answer) as lorakit examples."""
    out = []
    for row in encoded:
        n = len(row["prompt_input_ids"])
        assert row["chosen_input_ids"][:n] == row["prompt_input_ids"] == row["rejected_input_ids"][:n]
        out.append({"prompt_ids": row["prompt_input_ids"], "chosen_ids": row["chosen_input_ids"][n:],
                    "rejected_ids": row["rejected_input_ids"][n:]})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task,options", [("orpo", {}), ("simpo", {"cpo_alpha": 0.0}),
                                          ("simpo", {"cpo_alpha": 0.5, "label_smoothing": 0.1})])
def test_orpo_and_simpo_equal_trl(causal_dir, tmp_path, task, options):
    if task == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
        ours_options = {"task": "orpo", "beta": 0.2}
        args = trl_args(Config, tmp_path, beta=0.2, max_length=64)
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
        ours_options = {"task": "dpo", "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.7, **options}
        args = trl_args(Config, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.7, max_length=64,
                        cpo_alpha=options["cpo_alpha"], label_smoothing=options.get("label_smoothing", 0.0))
    rows = pair_rows(chat=False)
    trainer = trl_trainer(Trainer, args, causal_dir, rows)
    encoded = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(encoded))
    theirs.backward()

    ours_model = lorakit_twin(causal_dir, trainer.model, tmp_path)
    objective_, _ = objective(causal_dir, **ours_options)
    loss, _, _ = objective_._loss(stand_in_trainer(ours_model), _from_trl_pairs(encoded), grad=True)
    loss.backward()
    assert_same(loss, ours_model, theirs, trainer.model)


@pytest.mark.slow
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(causal_dir, tmp_path, weights):
    from trl import KTOConfig, KTOTrainer

    rows = []
    for i, r in enumerate(review_rows(4)):
        other = "negative" if r["label"] == "positive" else "positive"
        rows.append({"prompt": [{"role": "user", "content": r["text"]}],
                     "completion": [{"role": "assistant", "content": r["label"] if i % 2 == 0 else "very " + other}],
                     "label": i % 2 == 0})
    args = trl_args(KTOConfig, tmp_path, beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1],
                    max_length=64)
    trainer = trl_trainer(KTOTrainer, args, causal_dir, rows)
    encoded = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(encoded))
    theirs.backward()

    ours_model = lorakit_twin(causal_dir, trainer.model, tmp_path)
    task, _ = objective(causal_dir, task="kto", beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1])
    examples = task.encode(rows, "train")
    assert [e["completion_ids"] for e in examples] == [e["completion_ids"] for e in encoded]
    assert [e["kl_ids"] for e in examples] == [e["KL_completion_ids"] for e in encoded]
    loss, _, logs = task._loss(stand_in_trainer(ours_model), examples, grad=True)
    loss.backward()
    assert_same(loss, ours_model, theirs, trainer.model)
    assert logs["kl"] >= 0


def _grpo_batch(causal_dir, group=2, seed=0):
    """Fixed prompts (left-padded, TRL's layout), completions (right-padded) and advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[2, 18, 23, 26, 28]] * 2 + [[2, 19, 24, 30]] * 2  # G = 2 completions per prompt
    completions = [[31, 5, 7], [32, 5], [33, 34, 5, 8], [31]]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[0] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [0] * (width_c - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
    rewards = torch.rand(len(prompts), generator=gen)
    return prompts, completions, prompt_ids, prompt_mask, completion_ids, completion_mask, rewards


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta,iterations", [("dapo", 0.0, 1), ("dapo", 0.04, 2), ("grpo", 0.1, 2),
                                                       ("dr_grpo", 0.0, 2), ("bnpo", 0.04, 1)])
def test_grpo_loss_equals_trl(causal_dir, tmp_path, loss_type, beta, iterations):
    from trl import GRPOConfig, GRPOTrainer

    from lorakit.training.objectives.losses import group_advantages

    rows = [{"prompt": "the film was good"}] * 4
    args = trl_args(GRPOConfig, tmp_path, beta=beta, loss_type=loss_type, num_generations=2, max_completion_length=6,
                    temperature=0.8, epsilon=0.2, epsilon_high=0.28, num_iterations=iterations)

    def reward(prompts, completions, **kw):
        return [0.0] * len(prompts)

    trainer = trl_trainer(GRPOTrainer, args, causal_dir, rows, reward_funcs=reward)
    trainer.current_gradient_accumulation_steps = 1
    prompts, completions, prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = _grpo_batch(causal_dir)
    advantages = group_advantages(rewards, 2)
    gen = torch.Generator().manual_seed(1)
    noise = lambda: torch.randn(completion_ids.shape, generator=gen) * 0.3  # noqa: E731
    with torch.no_grad():
        full = torch.cat([prompt_ids, completion_ids], 1)
        logits = trainer.model(input_ids=full, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        current = torch.log_softmax(logits[:, -completion_ids.shape[1] - 1:-1].float() / 0.8, -1).gather(
            -1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old, ref = current + noise(), current + noise()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if iterations > 1:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()

    ours_model = lorakit_twin(causal_dir, trainer.model, tmp_path)
    task, _ = objective(causal_dir, task="grpo", beta=beta, loss_type=loss_type, num_generations=2,
                        max_completion_length=6, temperature=0.8, epsilon=0.2, epsilon_high=0.28,
                        num_iterations=iterations)
    trainer = stand_in_trainer(ours_model)
    item = task.item_for(trainer, prompts[::2], completions, advantages)
    item["old"], item["ref"] = (old if iterations > 1 else None), (ref if beta else None)
    task.tokens_per_process = float(completion_mask.sum())
    loss, _, logs = task.loss_on(trainer, item)
    loss.backward()
    assert_same(loss, ours_model, theirs, trainer.model)
    assert (logs["kl"] > 0) == (beta > 0)
