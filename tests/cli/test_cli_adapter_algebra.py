"""`lorakit combine` (equal to PEFT's combination) and `lorakit extract`, through the CLI."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main
from tests.helpers import randomize_lora

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def two_adapters(causal_dir, tmp_path):
    paths = []
    for seed, name in ((1, "a"), (2, "b")):
        model = AutoModelForCausalLM.from_pretrained(causal_dir)
        lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
        randomize_lora(model, seed=seed)
        paths.append(lk.save_adapter(model, tmp_path / name))
    return paths


def peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method, extra", [("ties", ["--density", "0.5"]), ("svd", ["--svd-rank", "6"])])
def test_combine_equals_peft(method, extra, causal_dir, two_adapters, tmp_path, capsys):
    out = tmp_path / "combined"
    code = main(["combine", *map(str, two_adapters), "--weights", "0.6,-0.3", "--method", method, *extra,
                 "--base", causal_dir, "--output", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["r"] == (6 if method == "svd" else 4)

    ids = torch.randint(5, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_dir), two_adapters[0], "a")
    pm.load_adapter(two_adapters[1], "b")
    kwargs = {"density": 0.5} if method == "ties" else {"svd_rank": 6}
    pm.add_weighted_adapter(["a", "b"], [0.6, -0.3], "ab", combination_type=method, **kwargs)
    pm.set_adapter("ab")
    expected = peft_logits(pm, ids)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_dir), out)  # PEFT reads it
    assert torch.allclose(peft_logits(loaded, ids), expected, atol=1e-4)
    assert not torch.allclose(expected,
                              peft_logits(AutoModelForCausalLM.from_pretrained(causal_dir), ids), atol=1e-3)


def test_bad_inputs_write_nothing(causal_dir, two_adapters, tmp_path, capsys):
    out = tmp_path / "combined"
    code = main(["combine", *map(str, two_adapters), "--method", "ties", "--density", "1.5", "--base", causal_dir,
                 "--output", str(out)])
    assert code == 2 and "density must be in (0, 1]" in capsys.readouterr().err
    config_path = two_adapters[1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "some/other-model"
    config_path.write_text(json.dumps(config))
    code = main(["combine", *map(str, two_adapters), "--base", causal_dir, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "differ in base_model_name_or_path" in err and "some/other-model" in err
    assert not out.exists()


def test_extract_writes_adapter_report_and_plot(classifier_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    tuned = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2)
    with torch.no_grad():
        for module in tuned.bert.encoder.layer[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight += 0.05 * torch.randn_like(module.weight)
    tuned.save_pretrained(tmp_path / "tuned")
    code = main(["extract", "--base", classifier_dir, "--tuned", str(tmp_path / "tuned"), "--energy", "0.5",
                 "--output", str(tmp_path / "adapter"), "--plot", str(tmp_path / "plots"), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 6 and all(m["retained_energy"] >= 0.5 for m in report["modules"])
    assert (tmp_path / "plots" / "extraction.png").stat().st_size > 10_000
    peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2),
                                   tmp_path / "adapter")
    code = main(["extract", "--base", classifier_dir, "--tuned", str(tmp_path / "tuned"), "--rank", "0",
                 "--output", str(tmp_path / "bad")])
    assert code == 2 and "rank must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
