"""Decoding steps' LoRA term through lorakit's mixed-adapter kernel: taken by an fp32 or bf16 CPU
engine once its sums equal torch's, replies equal offline `generate` with it on and off, and
--lora-kernel off, fp16, a kernel whose sums differ or more threads keep torch's GEMMs, saying why."""


import pytest
import torch

from lorakit.kernels.mixed_lora import MixedLora
from lorakit.serving import ServingError, lora_kernel
from lorakit.serving.lora_kernel import lora_kernel_for_threads, use_lora_kernel
from tests.helpers import answers_as_offline, make_engine, needs_compiler, tiny_llama

pytestmark = needs_compiler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_cpu_model_takes_the_kernel_once_its_sums_equal_torchs(dtype):
    kernel, note = use_lora_kernel(tiny_llama().to(dtype))
    assert isinstance(kernel, MixedLora) and note.startswith("lorakit's kernel")


def test_everything_else_keeps_torchs_gemms_and_says_why(monkeypatch):
    assert use_lora_kernel(tiny_llama(), "off") == (None, "torch's GEMMs (--lora-kernel off)")
    kernel, note = use_lora_kernel(tiny_llama().half())
    assert kernel is None and "fp32 or bf16 on CPU" in note
    monkeypatch.setattr(lora_kernel, "kernel_equals_torch", lambda kernel, dtype: False)
    kernel, note = use_lora_kernel(tiny_llama())
    assert kernel is None and "differ from torch's" in note


def test_a_forward_on_more_threads_than_the_kernel_is_for_keeps_the_gemms(monkeypatch):
    kernel, _ = use_lora_kernel(tiny_llama())
    monkeypatch.setattr(lora_kernel, "MAX_THREADS", torch.get_num_threads())
    assert lora_kernel_for_threads(kernel) is kernel
    monkeypatch.setattr(lora_kernel, "MAX_THREADS", torch.get_num_threads() - 1)
    assert lora_kernel_for_threads(kernel) is None


def test_a_bad_setting_is_refused(causal_dir, adapter_dir):
    with pytest.raises(ServingError, match="lora_kernel must be one of auto, off"):
        make_engine(causal_dir, adapter_dir, lora_kernel="on")


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_replies_through_the_kernel_equal_offline_generate(causal_dir, adapter_dir, monkeypatch, setting):
    rows_seen = []
    add = MixedLora.add

    def counted(self, result, x, A, B, slots):
        rows_seen.append(slots.tolist())
        return add(self, result, x, A, B, slots)
    monkeypatch.setattr(MixedLora, "add", counted)
    monkeypatch.setattr(lora_kernel, "MAX_THREADS", 1024)  # whatever this machine's thread count
    engine = make_engine(causal_dir, adapter_dir, lora_kernel=setting)
    try:
        assert (engine.lora_kernel is not None) == (setting == "auto"), engine.lora_kernel_note
        jobs = [("alpha", "the film was really good and the plot", 9), ("base", "a movie", 12),
                ("beta", "the actor is quite lovely and the music is very", 7), ("alpha", "the plot was dull", 10)]
        answers_as_offline(engine, causal_dir, adapter_dir, jobs)
    finally:
        engine.close()
    if setting == "off":
        assert rows_seen == []
    else:  # decoding steps mixing both adapters and the base went through the kernel
        assert any(-1 in slots and len(set(slots)) > 2 for slots in rows_seen)
