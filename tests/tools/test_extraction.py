"""Extraction: a full fine-tune (here: a perturbed tiny BERT classifier) back into a PEFT-format LoRA."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import lorakit as lk
from lorakit.tools.extraction import extract


@pytest.fixture
def tuned_dir(classifier_dir, tmp_path):
    """The base plus a rank-3 change in every linear layer, a small full-rank one in the values,
    a moved LayerNorm and a new 2-label head: what a full fine-tune leaves."""
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "classifier":
                out_f, in_f = module.weight.shape
                module.weight += 0.3 * torch.randn(out_f, 3) @ torch.randn(3, in_f) / in_f ** 0.5
                if name.endswith("value"):
                    module.weight += 0.1 * torch.randn(out_f, in_f)
                module.bias += 0.05
        model.bert.embeddings.LayerNorm.weight += 0.1
    model.save_pretrained(tmp_path / "tuned")
    return tmp_path / "tuned"


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_rank_extraction_reproduces_the_fine_tune(classifier_dir, tuned_dir, tmp_path):
    report = extract(classifier_dir, tuned_dir, tmp_path / "adapter", rank=64, keep_changed=True)
    ids = torch.randint(5, 30, (3, 10), generator=torch.Generator().manual_seed(0))
    tuned = AutoModelForSequenceClassification.from_pretrained(tuned_dir).eval()
    base = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # PEFT reads it
    assert torch.allclose(outputs(loaded, ids), outputs(tuned, ids), atol=1e-4)
    ours = lk.load_adapter(AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2).eval(),
                           tmp_path / "adapter")
    assert torch.allclose(outputs(ours, ids), outputs(tuned, ids), atol=1e-4)
    assert report["min_retained_energy"] > 0.999999 and report["stored_biases"]
    assert report["stored_modules_to_save"] == ["bert.embeddings.LayerNorm", "classifier"]


def test_energy_picks_ranks_per_module_and_reports_true_errors(classifier_dir, tuned_dir, tmp_path):
    report = extract(classifier_dir, tuned_dir, tmp_path / "adapter", energy=0.9)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base = BertModel.from_pretrained(classifier_dir).state_dict()
    tuned = AutoModelForSequenceClassification.from_pretrained(tuned_dir).state_dict()
    values_rank = {m["module"]: m["rank"] for m in report["modules"]}
    assert max(values_rank.values()) > 3 and min(values_rank.values()) <= 3  # values need more: full-rank noise
    for row in report["modules"]:
        path = row["module"]
        A = tensors[f"base_model.model.{path}.lora_A.weight"]
        B = tensors[f"base_model.model.{path}.lora_B.weight"]
        delta = tuned[f"{path}.weight"] - base[path.removeprefix("bert.") + ".weight"]
        error = float((delta - B @ A).norm() / delta.norm())
        assert row["retained_energy"] >= 0.9 and abs(error - row["relative_error"]) < 1e-4
        r = config["rank_pattern"].get(path, config["r"])
        assert A.shape[0] == r == row["rank"] and config["alpha_pattern"].get(path, config["lora_alpha"]) == r
    assert report["changed_not_linear"] and not report["stored_biases"]
    assert report["stored_modules_to_save"] == ["classifier"]  # the new head, always


def test_different_architectures_are_named_and_nothing_is_written(tuned_dir, tmp_path):
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=40, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(other)
    with pytest.raises(lk.ConfigError, match=r"shape \[.*\] in the base and \[.*\] in the tuned"):
        extract(other, tuned_dir, tmp_path / "adapter", rank=4)
    with pytest.raises(lk.ConfigError, match="energy must be in"):
        extract(other, tuned_dir, tmp_path / "adapter", energy=1.5)
    assert not (tmp_path / "adapter").exists()
