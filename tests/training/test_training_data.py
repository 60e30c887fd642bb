import json

import pytest
from transformers import AutoTokenizer

from lorakit.errors import ConfigError
from lorakit.training.data import collate, encode, label_names, load_splits, read_file_rows, sft_pairs


def test_single_file_is_split_80_10_10_deterministically(reviews_csv):
    first, second = load_splits(reviews_csv, seed=3), load_splits(reviews_csv, seed=3)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [128, 16, 16]
    assert first == second
    assert load_splits(reviews_csv, seed=4)["test"] != first["test"]


def test_directory_of_split_files_in_several_formats(tmp_path):
    import pandas as pd

    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    pd.DataFrame(rows[:3]).to_csv(tmp_path / "test.csv", index=False)
    splits = load_splits(str(tmp_path))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [10, 4, 3]
    assert splits["train"][3] == {"text": "t3", "label": 1}


def test_embedded_data_sets_split_without_leaks():
    rt = load_splits("rotten-tomatoes")
    assert sum(len(v) for v in rt.values()) > 12000 and len(rt["test"]) > 1000
    assert label_names(rt["train"], "label") == ["negative", "positive"]
    hamlet = load_splits("hamlet")
    assert hamlet["train"] and hamlet["test"] and not set(r["text"] for r in hamlet["test"]) & set(r["text"] for r in hamlet["train"])


def test_unknown_data_lists_embedded_names(tmp_path):
    with pytest.raises(ConfigError, match="rotten-tomatoes.*bbc-news|bbc-news.*rotten-tomatoes"):
        load_splits("imdb")
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(ConfigError, match="supported file types"):
        load_splits(str(tmp_path / "notes.docx"))


def test_missing_column_names_the_available_ones(reviews_csv, classifier_dir):
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    rows = load_splits(reviews_csv)["train"]
    with pytest.raises(ConfigError, match=r"'sentence'.*available columns: text, label"):
        encode(rows, tokenizer, "classify", 32, "train", text_column="sentence", labels=["negative", "positive"])


def test_labels_missing_from_training_are_an_error(reviews_csv, classifier_dir):
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    rows = [{"text": "good", "label": "neutral"}]
    with pytest.raises(ConfigError, match="neutral.*not seen in training"):
        encode(rows, tokenizer, "classify", 32, "test", labels=["negative", "positive"])


def test_long_rows_are_truncated_with_a_warning(classifier_dir):
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    rows = [{"text": "good " * 50, "label": "positive"}, {"text": "bad", "label": "negative"}]
    with pytest.warns(UserWarning, match=r"longer than 8 tokens were truncated \(1 of \d+ train\)"):
        examples = encode(rows, tokenizer, "classify", 8, "train", labels=["negative", "positive"])
    assert [len(e["input_ids"]) for e in examples] == [8, 3]


def test_sft_trains_only_on_the_answer_and_its_end_marker(causal_dir):
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    rows = [{"prompt": "review: the film was good", "response": "positive"}]
    (example,) = encode(rows, tokenizer, "sft", 64, "train")
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.convert_ids_to_tokens(trained) == ["positive", "<|im_end|>"]
    prompt_tokens = tokenizer.convert_ids_to_tokens([i for i, l in zip(example["input_ids"], example["labels"]) if l == -100])
    assert prompt_tokens == ["<|im_start|>", "user", "review", ":", "the", "film", "was", "good", "<|im_end|>",
                             "<|im_start|>", "assistant"]


def test_sft_templates_and_messages(causal_dir):
    rows = [{"text": "dull", "label": "negative"}]
    assert sft_pairs(rows, "train", "Review: {text}", "{label}") == ([([{"role": "user", "content": "Review: dull"}], "negative")])
    with pytest.raises(ConfigError, match="template column 'review' not found"):
        sft_pairs(rows, "train", "{review}", "{label}")
    with pytest.raises(ConfigError, match=r"columns 'text', 'label'.*match no SFT layout.*ShareGPT.*Alpaca"):
        sft_pairs(rows, "train", None, None)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert sft_pairs(chat, "train", None, None) == [([{"role": "user", "content": "hi"}], "hello")]


def test_lm_packs_text_into_full_blocks(text_file, causal_dir):
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    rows = load_splits(text_file)["train"]
    examples = encode(rows, tokenizer, "lm", 16, "train")
    assert all(len(e["input_ids"]) == 16 for e in examples[:-1]) and examples[0]["labels"] == examples[0]["input_ids"]
    total = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert sum(len(e["input_ids"]) for e in examples) in (total, total - 1)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_alpaca_keeps_the_input_beside_the_instruction():
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "input": "", "output": "red"}]
    pairs = sft_pairs(rows, "train", None, None)
    assert pairs[0] == ([{"role": "user", "content": "Translate to French.\n\ncat"}], "chat")
    assert pairs[1] == ([{"role": "user", "content": "Name a colour."}], "red")


def test_sharegpt_openai_and_prompt_completion_layouts():
    sharegpt = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"}]}]
    assert sft_pairs(sharegpt, "train", None, None) == [
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "hello")]
    messages = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    assert sft_pairs(messages, "train", None, None) == [([{"role": "user", "content": "2+2?"}], "4")]
    completion = [{"prompt": "Say yes", "completion": "yes"}]
    assert sft_pairs(completion, "train", None, None) == [([{"role": "user", "content": "Say yes"}], "yes")]
    with pytest.raises(ConfigError, match="must end with an assistant turn"):
        sft_pairs([{"conversations": [{"from": "human", "value": "hi"}]}], "train", None, None)
    with pytest.raises(ConfigError, match="from='robot'"):
        sft_pairs([{"conversations": [{"from": "robot", "value": "hi"}]}], "train", None, None)


def test_a_file_given_for_evaluation_is_read_whole_in_order(reviews_csv):
    rows = read_file_rows(reviews_csv)
    assert len(rows) == sum(len(v) for v in load_splits(reviews_csv).values())
    assert read_file_rows("rotten-tomatoes") is None


def test_list_flags_take_commas_or_spaces():
    from lorakit.cli.training import list_flag

    assert list_flag(["q_proj,v_proj", "o_proj"]) == ["q_proj", "v_proj", "o_proj"]
    assert list_flag([".*\\.(q|v)_proj"]) == [".*\\.(q|v)_proj"]
    assert list_flag(["a{1,2}"]) == ["a{1,2}"]  # a regex keeps its commas
