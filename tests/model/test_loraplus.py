"""LoRA+ parameter groups equal PEFT's create_loraplus_optimizer."""

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import lorakit as lk
from tests.zoo import BY_NAME


def group_names(optimizer, model, strip=""):
    names = {id(p): n.removeprefix(strip).replace(".lora_magnitude_vector.default.weight",
                                                   ".lora_magnitude_vector.default")
             for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("arch_name, fields", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)),
    ("bert-seqcls", dict(target_modules="all-linear", task_type="SEQ_CLS", bias="all")),
])
def test_loraplus_groups_equal_peft(arch_name, fields):
    torch.manual_seed(0)
    base = BY_NAME[arch_name].build()
    config = dict(r=2, lora_alpha=4, **fields)
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    kwargs = dict(lr=2e-4, loraplus_weight_decay=0.01)
    mine = lk.loraplus_optimizer(ours, torch.optim.AdamW, lr=2e-4, ratio=16, weight_decay=0.01)
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, loraplus_lr_ratio=16, **kwargs)
    assert group_names(mine, ours) == group_names(reference, theirs, "base_model.model.")
    assert sum(len(g["params"]) for g in mine.param_groups) == sum(p.requires_grad for p in ours.parameters())


def test_bad_ratio_is_refused():
    model = lk.inject(BY_NAME["llama"].build(), lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match="ratio .* must be > 0"):
        lk.loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, ratio=0)
