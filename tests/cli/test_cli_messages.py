"""User errors end in one line naming the file, line, column or path, and the fix: no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import TINY, run_cli


def test_a_bad_jsonl_line_is_named_with_its_line_and_column(classifier_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": f"the film was good {i}", "label": "positive"}) for i in range(60)]
    lines[56] = '{"text": "the plot", "label" "negative"}'  # line 57: a missing colon
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "train", "--model", classifier_dir, "--data", data, "--output", tmp_path / "r", *TINY)
    assert code == 2 and f"{data} line 57, column 30" in err and "Traceback" not in err


@pytest.mark.parametrize("content, says", [("", "is empty"), ("text,label\n", "has a header line but no rows")])
def test_an_empty_csv_says_so(content, says, classifier_dir, tmp_path, capsys):
    data = tmp_path / "rows.csv"
    data.write_text(content)
    code, _, err = run_cli(capsys, "train", "--model", classifier_dir, "--data", data, "--output", tmp_path / "r", *TINY)
    assert code == 2 and says in err and str(data) in err


def test_generate_on_a_classifier_run_points_to_predict(trained, capsys):  # noqa: F811
    """Before: an AttributeError traceback."""
    code, _, err = run_cli(capsys, "generate", trained, "--prompt", "the film")
    assert code == 2 and "is a classifier" in err and "lorakit predict" in err


def test_merge_with_the_runs_own_base_works(trained, classifier_dir, tmp_path, capsys):  # noqa: F811
    """Before: the adapter's own base was refused as "made for another base" (its head is in the adapter)."""
    code, _, err = run_cli(capsys, "merge", trained, "--base", classifier_dir, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    from lorakit.hub.models import load_trained

    model, _, _ = load_trained(trained)
    ids = AutoTokenizer.from_pretrained(classifier_dir)(["the film was good"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_reloading_a_trained_classifier_does_not_announce_a_new_head(trained, capsys):  # noqa: F811
    from lorakit.hub.models import load_trained

    capsys.readouterr()
    load_trained(trained)
    assert "is new" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["analyze"], ["compress", "--rank", "2", "--output", "OUT"]])
def test_an_adapter_whose_config_rank_disagrees_with_its_tensors_is_refused(command, trained, tmp_path, capsys):  # noqa: F811
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    config["r"] = 4  # the tensors have rank 8
    (broken / "adapter_config.json").write_text(json.dumps(config))
    save_file(load_file(trained / "adapter" / "adapter_model.safetensors"), broken / "adapter_model.safetensors")
    argv = [a if a != "OUT" else str(tmp_path / "out") for a in command]
    code, _, err = run_cli(capsys, argv[0], broken, *argv[1:])
    assert code == 2 and "rank 8" in err and "r=4" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_clear_error(classifier_dir, reviews_csv, tmp_path):
    """Before: torch's "basic_ios::clear: iostream error" traceback. RLIMIT_FSIZE fails writes with
    EFBIG as a full disk fails them with ENOSPC."""
    script = ("import resource, signal, sys; from lorakit.cli import main; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); sys.exit(main(sys.argv[1:]))")
    argv = ["train", "--model", classifier_dir, "--data", reviews_csv, "--output", str(tmp_path / "run"), *TINY]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "could not write" in done.stderr and "free some space" in done.stderr
    assert not (tmp_path / "run" / "adapter").exists()
