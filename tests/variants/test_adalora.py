"""AdaLoRA against the real peft package: same losses and ranks step by step, the format both ways."""

import json

import peft
import pytest
import torch

import lorakit as lk
from lorakit.model.adalora import RankAllocator
from tests.helpers import VOCAB, logits, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]
SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=2, total_step=10, deltaT=1, lora_alpha=16)


def batch(step):
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(step + 1))


@pytest.fixture
def twins(tmp_path):
    """A PEFT AdaLoRA model and a lorakit model holding the same initial adapter."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS,
                                                                    **SCHEDULE))
    theirs.save_pretrained(tmp_path / "init")
    ours = lk.load_adapter(tiny_llama(), tmp_path / "init", is_trainable=True)
    return theirs, ours


def test_training_matches_peft_step_by_step(twins, tmp_path):
    theirs, ours = twins
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    assert len(opt_theirs.param_groups[0]["params"]) == len(opt_ours.param_groups[0]["params"]) == 18
    seen_ranks = set()
    for step in range(SCHEDULE["total_step"]):
        x = batch(step)
        loss_theirs = theirs(input_ids=x, labels=x).loss  # both add the orthogonality penalty
        loss_theirs.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        loss_ours = ours(input_ids=x, labels=x).loss
        loss_ours.backward()
        opt_ours.step()
        lk.update_and_allocate(ours, step)
        opt_ours.zero_grad()
        assert torch.allclose(loss_ours, loss_theirs, atol=1e-5)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            expected = {k.replace(".lora_E.default", ""): sum(v) for k, v in pattern.items()}
            assert lk.current_ranks(ours) == expected
            seen_ranks.add(tuple(expected.values()))
    ranks = lk.current_ranks(ours)
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks) and len(set(ranks.values())) > 1
    assert len(seen_ranks) > 2  # the budget moved through several allocations

    theirs.save_pretrained(tmp_path / "theirs")
    lk.save_adapter(ours, tmp_path / "ours")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())  # noqa: E731
    assert read("ours")["peft_type"] == "ADALORA" and read("ours")["rank_pattern"] == read("theirs")["rank_pattern"]
    ids = batch(99)
    want = logits(ours.eval(), ids)
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval(), ids), want,
                          atol=1e-5)
    assert torch.allclose(logits(lk.load_adapter(tiny_llama(), tmp_path / "theirs").eval(), ids),
                          logits(theirs.eval(), ids), atol=1e-5)
    merged = lk.unload(lk.load_adapter(tiny_llama(), tmp_path / "ours"))
    assert torch.allclose(logits(merged, ids), want, atol=1e-5)


def test_budget_schedule_and_masks_equal_peft_on_the_same_scores(twins):
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    theirs, ours = twins
    peft_allocator = theirs.base_model.rankallocator
    ours_allocator = RankAllocator(ours, "default", ours._lorakit_registry.configs["default"])
    assert isinstance(peft_allocator, PeftAllocator)
    for step in range(SCHEDULE["total_step"] + 2):
        assert ours_allocator.budget(step) == peft_allocator.budget_schedule(step)
    generator = torch.Generator().manual_seed(3)
    params = dict(theirs.base_model.model.named_parameters())
    for path, layer in ours_allocator.layers:
        for kind in ("A", "B", "E"):
            name = f"{path}.lora_{kind}.default"
            sensitivity = torch.rand(params[name].shape, generator=generator)
            uncertainty = torch.rand(params[name].shape, generator=generator)
            peft_allocator.exp_avg_ipt[name], peft_allocator.exp_avg_unc[name] = sensitivity, uncertainty
            ours_allocator.sensitivity[(path, kind)], ours_allocator.uncertainty[(path, kind)] = sensitivity, uncertainty
    for budget in (30, 24, 18, 9):
        pattern = peft_allocator.mask_to_budget(theirs.base_model.model, budget)
        ours_allocator.mask_to_budget(budget)
        assert lk.current_ranks(ours) == {k.replace(".lora_E.default", ""): sum(v) for k, v in pattern.items()}
        assert sum(lk.current_ranks(ours).values()) == budget


@pytest.mark.parametrize("fields, message", [
    (dict(init_r=4, target_r=8, total_step=10), "target_r must be in 1..init_r"),
    (dict(total_step=10, tinit=6, tfinal=4), "no budgeting phase"),
    (dict(), "needs total_step"),
    (dict(total_step=10, use_dora=True), "cannot use DoRA"),
    (dict(total_step=10, beta1=1.0), "beta1 must be in"),
])
def test_bad_configs(fields, message):
    with pytest.raises(lk.ConfigError, match=message):
        lk.AdaLoraConfig(target_modules=TARGETS, **fields)


def test_unsupported_layers_and_a_second_trainable_adapter_are_refused():
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="adapts nn.Linear and Conv1D layers only"):
        lk.inject(model, lk.AdaLoraConfig(target_modules=["embed_tokens"], total_step=10))
    assert not hasattr(model, "_lorakit_registry") or not model._lorakit_registry.configs
    lk.inject(model, lk.AdaLoraConfig(target_modules=TARGETS, total_step=10))
    with pytest.raises(lk.LoraError, match="one adapter at a time"):
        lk.inject(model, lk.AdaLoraConfig(target_modules=TARGETS, total_step=10), "second")


def test_mixed_batch_serves_adalora_rows_beside_lora_rows(twins, tmp_path):
    """Mixed batches (and so `lorakit serve`) take an AdaLoRA adapter: its Λ is folded into A."""
    theirs, _ = twins
    torch.manual_seed(5)
    with torch.no_grad():  # a trained-looking adapter: Λ non-zero, some triplets pruned
        for name, param in theirs.named_parameters():
            if "lora_E" in name:
                param.normal_()
                param[::3] = 0
    theirs.save_pretrained(tmp_path / "ada")
    model = tiny_llama()
    lk.load_adapter(model, tmp_path / "ada", "ada")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "plain")
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    names = ["ada", "plain", lk.BASE]
    with lk.mixed_batch(model, names):
        mixed = logits(model, ids)
    want_ada = logits(theirs.eval(), ids)
    assert torch.allclose(mixed[0], want_ada[0], atol=1e-5)
    lk.set_adapter(model, "plain")
    assert torch.allclose(mixed[1], logits(model, ids)[1], atol=1e-5)
