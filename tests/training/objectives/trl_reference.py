"""Drivers for the parity tests: TRL's trainers and lorakit's objectives on one batch of one model.

TRL side: its trainer on a PEFT LoRA model whose B matrices were randomised after the trainer was
built (so policy and reference differ: the reference is the adapter switched off). lorakit side:
the same base and the same adapter weights loaded as a trainable lorakit adapter, run through the
objective's loss with a minimal stand-in for the trainer.
"""

import types
import warnings

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk
from lorakit.training.objectives import objective_for
from lorakit.training.objectives.base import TokenLogProbLM
from lorakit.training.options import resolve_options

TARGETS = ["q_proj", "v_proj"]


def randomise_b(peft_model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


PEFT_CONFIG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def trl_trainer(trainer_class, config, model_dir, rows, **kw):
    """A TRL trainer that adds a fresh PEFT adapter to the base, whose B is then randomised."""
    from datasets import Dataset

    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config,
                            train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir),
                            peft_config=PEFT_CONFIG, **kw)
    randomise_b(trainer.model)
    return trainer


def lora_grads(model, strip="base_model.model."):
    return {n.removeprefix(strip): p.grad.clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def lorakit_twin(model_dir, peft_model, tmp_path):
    """The base model with ``peft_model``'s adapter loaded as lorakit's trainable "default"."""
    peft_model.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.load_adapter(model, tmp_path / "adapter", is_trainable=True)
    return model


def stand_in_trainer(model, grad_accum=1):
    """What an objective reads of the trainer: the model, the step runner, the device, the step."""
    runner = TokenLogProbLM(model)
    dist = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1,
                                 to_device=lambda batch: batch, sum=lambda value: value)
    return types.SimpleNamespace(model=model, wrapped=runner, runner_module=runner, dist=dist, step=0)


def objective(model_dir, **options):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = dict(model=model_dir, data="unused", output="unused", seq_len=64, batch_size=4, dropout=0.0, r=4,
                targets=TARGETS)
    base.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = resolve_options(None, base)
    return objective_for(resolved, tokenizer, resolved.seq_len), tokenizer


def trl_args(config_class, tmp_path, **kw):
    return config_class(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                        bf16=False, **kw)


def collate_pairs(examples, pad_id):
    """Pairs as TRL lays them out: chosen rows, then rejected, each with its prompt, right-padded
    (input_ids, attention_mask, completion_mask); lorakit's own layout shares the prompt."""
    rows = [e["prompt_ids"] + e[key] for key in ("chosen_ids", "rejected_ids") for e in examples]
    starts = [len(e["prompt_ids"]) for _ in range(2) for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, :len(row)] = 1
        completion[i, start:len(row)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
