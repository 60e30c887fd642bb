import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit as lk
from lorakit.cli import build_parser, main
from lorakit.hub.models import load_trained
from tests.helpers import TINY, run_cli


def test_every_command_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "eval", "predict", "generate", "merge", "sweep", "demo", "estimate", "analyze", "compress"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0 and "usage: lorakit " + name in capsys.readouterr().out


def test_flags_override_the_yaml_file_and_the_resolved_config_is_saved(classifier_dir, reviews_csv, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": classifier_dir, "data": reviews_csv, "r": 4, "lr": 0.02,
                                      "max-steps": 3, "batch_size": 8, "seq_len": 32}))
    code, out, _ = run_cli(capsys, "train", config, "--r", "2", "--output", tmp_path / "o", "--json")
    assert code == 0 and json.loads(out)["r"] == 2
    saved = yaml.safe_load((tmp_path / "o" / "train_config.yaml").read_text())
    assert (saved["r"], saved["lr"], saved["max_steps"]) == (2, 0.02, 3)
    config.write_text("learning_rate: 1")
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2 and "unknown training option(s) learning_rate" in err


def test_eval_predict_and_merge(trained, classifier_dir, reviews_csv, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", trained, "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["examples"] == 16 and sum(map(sum, metrics["confusion_matrix"])) == 16
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["labels"] == ["negative", "positive"]
    code, out, _ = run_cli(capsys, "eval", trained)
    assert "confusion matrix" in out and "macro_f1" in out
    # a file given for evaluation is evaluated whole (160 rows), not split; --split picks a training split
    code, out, _ = run_cli(capsys, "eval", trained, "--data", reviews_csv, "--json")
    assert code == 0 and json.loads(out)["examples"] == 160 and json.loads(out)["split"] == "all"
    code, out, _ = run_cli(capsys, "eval", trained, "--data", reviews_csv, "--split", "test", "--json")
    assert code == 0 and json.loads(out)["examples"] == 16

    code, out, _ = run_cli(capsys, "predict", trained, "--text", "the film was very superb", "--text", "a movie is dull", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)

    code, _, _ = run_cli(capsys, "merge", trained, "--output", tmp_path / "merged")
    assert code == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, tokenizer, _ = load_trained(trained)
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(["the plot was quite awful"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    code, _, err = run_cli(capsys, "merge", trained, "--output", tmp_path / "merged")
    assert code == 2 and "not empty; pass --overwrite" in err


def test_generate_with_an_sft_run(causal_dir, sft_jsonl, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "train", "--model", causal_dir, "--data", sft_jsonl, "--task", "sft",
                     "--output", tmp_path / "sft", *TINY)
    assert code == 0
    code, out, _ = run_cli(capsys, "generate", tmp_path / "sft", "--prompt", "review: the film was good",
                       "--max-new-tokens", "3", "--json")
    assert code == 0 and isinstance(json.loads(out)["reply"], str)
    code, out, _ = run_cli(capsys, "eval", tmp_path / "sft", "--json")
    assert code == 0 and json.loads(out)["perplexity"] > 1 and "answer_accuracy" in json.loads(out)


@pytest.mark.slow
def test_sweep_table_and_plot(classifier_dir, reviews_csv, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sweep", "--model", classifier_dir, "--data", reviews_csv, "--output", tmp_path / "sw",
                       "--ranks", "1,2", "--seeds", "0,1", *TINY, "--json")
    result = json.loads(out[out.index("{"):])
    assert code == 0 and [row["r"] for row in result["rows"]] == [1, 2]
    assert result["rows"][1]["lora_params"] == 2 * result["rows"][0]["lora_params"]
    assert len(result["rows"][0]["runs"]) == 2 and (tmp_path / "sw" / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--data", "imdb"], "unknown data 'imdb'.*rotten-tomatoes"),
    (["--model", "gpt-17"], "unknown model 'gpt-17'.*minilm, smollm2-135m"),
    (["--text-column", "review"], r"'review' not found in the train split; available columns: text, label"),
    (["--task", "translate"], "unknown task 'translate'"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, classifier_dir, reviews_csv, tmp_path, capsys):
    base = {"--model": classifier_dir, "--data": reviews_csv}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    code, _, err = run_cli(capsys, "train", *[x for kv in base.items() for x in kv], *argv[len(base) * 0:0],
                       "--output", tmp_path / "bad", *TINY)
    assert code == 2
    import re

    assert re.search(message, err), err


def test_empty_data_file(classifier_dir, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("text,label\n")
    code, _, err = run_cli(capsys, "train", "--model", classifier_dir, "--data", tmp_path / "empty.csv",
                       "--output", tmp_path / "o", *TINY)
    assert code == 2 and "empty" in err


@pytest.mark.parametrize("flags, check", [
    (["--use-dora"], lambda c: c["use_dora"] is True),
    (["--init", "pissa", "--targets", "query,value"], lambda c: c["r"] == 4 and c["init_lora_weights"] is True),
    (["--rslora", "--loraplus-ratio", "16"], lambda c: c["use_rslora"] is True),
])
def test_variant_flags_reach_the_saved_adapter(flags, check, classifier_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", classifier_dir, "--data", reviews_csv, "--output", out, *TINY,
                       "--r", "2", *flags)
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert check(config), config
    model, _, _ = load_trained(out)  # what was saved loads back onto the original base, every tensor as written
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    loaded = lk.adapter_state_dict(model)
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key].float(), tensor.float(), atol=0, rtol=0, msg=key)


def test_estimate_counts_dora_magnitudes(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--preset", "bert-base-uncased", "--r", "8", "--targets",
                       "query,key,value,attention.output.dense", "--json")
    plain = json.loads(out)["lora_params"]
    code, out, _ = run_cli(capsys, "estimate", "--preset", "bert-base-uncased", "--r", "8", "--targets",
                       "query,key,value,attention.output.dense", "--use-dora", "--json")
    assert plain == 589_824 and json.loads(out)["lora_params"] == plain + 48 * 768  # one per output feature


def test_bad_loraplus_ratio(classifier_dir, reviews_csv, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", classifier_dir, "--data", reviews_csv, "--output", tmp_path / "x",
                       "--loraplus-ratio", "0")
    assert code == 2 and "--loraplus-ratio must be > 0" in err
