"""`lorakit eval RUN --lm-eval`: lm-evaluation-harness on the base + adapter, with local YAML tasks over
JSON files (the hub is unreachable here): a multiple-choice task and a generation task."""

import json
from contextlib import nullcontext

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError
from tests.helpers import review_rows

pytest.importorskip("lm_eval")

MC_TASK = """task: reviews_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: reviews_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{label}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 2
  do_sample: false
filter_list:
  - name: none
    filter:
      - function: regex
        regex_pattern: "(positive|negative)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def lm_run(causal_dir, tmp_path):
    """A tiny lm run that learned to say a review's label after its text, and lm-eval tasks asking it."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"{r['text']} {r['label']}"}) + "\n" for r in review_rows(200)))
    assert main(["train", "--model", causal_dir, "--data", str(train), "--task", "lm", "--output",
                 str(tmp_path / "run"), "--max-steps", "40", "--batch-size", "16", "--seq-len", "16",
                 "--warmup-steps", "1", "--lr", "1e-2", "--dropout", "0"]) == 0
    rows = review_rows(40, seed=5)
    data = tmp_path / "tasks" / "reviews.json"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({**r, "gold": int(r["label"] == "positive")}) + "\n" for r in rows))
    (data.parent / "reviews_mc.yaml").write_text(MC_TASK.format(data=data))
    (data.parent / "reviews_gen.yaml").write_text(GEN_TASK.format(data=data))
    return tmp_path / "run", data.parent, rows


def own_accuracy(run, rows, base: bool) -> float:
    """The multiple-choice accuracy computed directly: the larger log-likelihood of " negative" /
    " positive" after the text, with the adapter on or off."""
    import lorakit as lk
    from lorakit.hub.models import load_trained

    model, tokenizer, _ = load_trained(run)
    model.eval()
    right = 0
    for row in rows:
        scores = []
        for choice in ("negative", "positive"):
            context = tokenizer(row["text"])["input_ids"]
            whole = tokenizer(row["text"] + " " + choice)["input_ids"]
            with torch.no_grad(), (lk.disable_adapters(model) if base else nullcontext()):
                logprobs = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += int(scores.index(max(scores)) == int(row["label"] == "positive"))
    return right / len(rows)


@pytest.mark.slow
def test_lm_eval_scores_the_adapter_and_the_base_side_by_side(lm_run, capsys):
    run, tasks, rows = lm_run
    capsys.readouterr()
    assert main(["eval", str(run), "--lm-eval", "reviews_mc,reviews_gen", "--lm-eval-include", str(tasks),
                 "--compare-base", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["tasks"]
    mc, gen = result["reviews_mc"], result["reviews_gen"]
    assert mc["adapter"]["acc"] == pytest.approx(own_accuracy(run, rows, base=False))
    assert mc["base"]["acc"] == pytest.approx(own_accuracy(run, rows, base=True))
    assert mc["adapter"]["acc"] >= 0.9 > mc["base"]["acc"]
    assert gen["adapter"]["exact_match"] >= 0.9 > gen["base"]["exact_match"]
    assert main(["eval", str(run), "--lm-eval", "reviews_mc", "--lm-eval-include", str(tasks)]) == 0
    assert "acc" in capsys.readouterr().out


def test_an_unknown_task_says_where_it_looked(tmp_path):
    from lorakit.tools.harness import run_lm_eval

    (tmp_path / "tasks").mkdir()  # checked before the run is loaded: no run needed
    with pytest.raises(ConfigError, match=r"lm-eval task reviews_nope not found: looked in lm-eval's \d+ bundled "
                                          r"tasks and groups and the YAML files under .*tasks"):
        run_lm_eval(tmp_path / "no-run", "reviews_nope", include=tmp_path / "tasks")
