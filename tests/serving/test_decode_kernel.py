"""Decoding steps through lorakit's attention kernel: used for an fp32 or bf16 CPU model once it
gives SDPA's logits, replies equal offline `generate` with it on and off, and everything else (fp16,
a model whose decoding differs, --decode-kernel off, more threads) keeps SDPA, saying why."""


import pytest
import torch

from lorakit.kernels.decode_attention import DecodeAttention
from lorakit.serving import decode_kernel
from lorakit.serving.attention import use_grouped_attention
from lorakit.serving.decode_kernel import decoding, use_decode_kernel
from tests.helpers import answers_as_offline, make_engine, needs_compiler, tiny_llama

pytestmark = needs_compiler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_model_takes_the_kernel_once_its_decoding_step_matches_sdpa(dtype):
    model = tiny_llama().to(dtype)
    use_grouped_attention(model)
    kernel, note = use_decode_kernel(model)
    assert isinstance(kernel, DecodeAttention) and note.startswith("lorakit's kernel")
    assert model.config._attn_implementation == "lorakit_grouped_sdpa"


def test_a_kernel_that_gives_other_logits_is_refused_and_the_model_left_as_it_was(monkeypatch):
    model = tiny_llama()
    before = model.config._attn_implementation
    wrong = DecodeAttention.attend
    monkeypatch.setattr(DecodeAttention, "attend", lambda self, q, k, v, lengths, longest, scale:
                        wrong(self, q, k, v, lengths.clamp_max(1), longest, scale))  # each row sees column 0 only
    kernel, note = use_decode_kernel(model)
    assert kernel is None and "differs" in note
    assert model.config._attn_implementation == before


def test_sdpa_stays_where_the_kernel_does_not_apply():
    assert use_decode_kernel(tiny_llama(), "off") == (None, "SDPA (--decode-kernel off)")
    kernel, note = use_decode_kernel(tiny_llama().to(torch.float16))
    assert kernel is None and "fp32 or bf16 on CPU" in note
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    kernel, note = use_decode_kernel(eager)
    assert kernel is None and "'eager'" in note


def test_a_forward_on_more_threads_than_the_kernel_is_for_keeps_sdpa(monkeypatch):
    kernel, _ = use_decode_kernel(tiny_llama())
    calls = []
    monkeypatch.setattr(decode_kernel, "set_decode_plan", calls.append)
    with decoding(kernel, torch.tensor([3, 5])):
        pass
    assert len(calls) == 2 and calls[0].lengths.tolist() == [4, 6] and calls[1] is None
    calls.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: decode_kernel.MAX_THREADS + 1)
    with decoding(kernel, torch.tensor([3, 5])):
        pass
    assert calls == []


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_replies_through_the_kernel_equal_offline_generate(causal_dir, adapter_dir, monkeypatch, setting):
    rows_seen = []
    attend = DecodeAttention.attend

    def counted(self, query, key, value, lengths, longest, scale):
        rows_seen.append(lengths.tolist())
        return attend(self, query, key, value, lengths, longest, scale)
    monkeypatch.setattr(DecodeAttention, "attend", counted)
    monkeypatch.setattr(decode_kernel, "MAX_THREADS", 1024)  # whatever this machine's thread count
    engine = make_engine(causal_dir, adapter_dir, decode_kernel=setting)
    try:
        assert (engine.decode_kernel is not None) == (setting == "auto"), engine.decode_kernel_note
        rows_seen.clear()  # the start-up check's step
        jobs = [("alpha", "the film was really good and the plot", 9), ("base", "a movie", 12),
                ("beta", "the actor is quite lovely and the music is very", 7), ("base", "the plot was dull", 10)]
        answers_as_offline(engine, causal_dir, adapter_dir, jobs)
    finally:
        engine.close()
    if setting == "off":
        assert rows_seen == []
    else:  # decoding steps of several rows of different lengths went through the kernel
        assert any(len(set(lengths)) > 1 for lengths in rows_seen)
