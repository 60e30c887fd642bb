import pytest

import lorakit as lk
from lorakit.model.targeting import find_targets, minimal_suffixes
from tests.helpers import tiny_bert, tiny_gpt2, tiny_llama


def targets(model, **kwargs):
    return find_targets(model, lk.LoraConfig(**kwargs))


def test_names_match_as_dotted_suffixes():
    found = targets(tiny_bert(), target_modules=["query", "attention.output.dense"])
    assert found == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1)
                     for m in ("attention.self.query", "attention.output.dense")]


def test_regex_matches_the_full_path():
    found = targets(tiny_llama(), target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_skips_output_head_and_embeddings():
    model = tiny_llama()
    found = targets(model, target_modules="all-linear")
    assert "lm_head" not in found and "model.embed_tokens" not in found
    assert len(found) == 2 * 7
    gpt = targets(tiny_gpt2(), target_modules="all-linear")
    assert "lm_head" not in gpt and len(gpt) == 2 * 4


def test_minimal_suffixes_reproduce_the_same_set():
    model = tiny_bert()
    chosen = targets(model, target_modules="all-linear")
    suffixes = minimal_suffixes(model, chosen)
    assert targets(model, target_modules=suffixes) == chosen


def test_exclude_and_layers_to_transform():
    model = tiny_llama(layers=3)
    found = targets(model, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2])
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_no_match_suggests_close_candidates():
    with pytest.raises(lk.TargetNotFoundError, match=r"'querry'.*Close candidates: \['query'"):
        targets(tiny_bert(), target_modules=["querry"])


def test_unsupported_module_type_is_named():
    with pytest.raises(lk.TargetNotFoundError, match="LayerNorm"):
        targets(tiny_bert(), target_modules=["attention.output.LayerNorm"])


def test_decoder_blocks_are_the_classes_transformers_will_not_split():
    from torch import nn

    from lorakit.model.targeting import decoder_blocks

    model = tiny_llama(layers=3)
    blocks = decoder_blocks(model)
    assert blocks == list(model.model.layers)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))  # wrappers do not hide the blocks
    assert decoder_blocks(model) == list(model.model.layers)
    assert decoder_blocks(nn.Sequential(nn.Linear(2, 2))) == []
