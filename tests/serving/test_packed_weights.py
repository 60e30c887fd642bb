"""The engine's packed fp32 weights: on where they pay (replies still equal offline `generate`),
said at start, refused when misnamed, dropped when they fail or differ, undone on close."""

import pytest
import torch

from lorakit.kernels import packed_linear
from lorakit.kernels.packed_linear import PackedLinear
from lorakit.serving import Limits, ServingError, build_engine
from lorakit.serving.packed_weights import use_packed_weights
from tests.helpers import offline, submit, tiny_llama

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="torch built without oneDNN")


@pytest.fixture
def every_size(monkeypatch):
    monkeypatch.setattr(packed_linear, "SMALL_WEIGHT", 1)  # the tiny test model's weights too
    monkeypatch.setattr(packed_linear, "CALIBRATE_MIN", 1)
    # packed wherever measured, so that the tests see packed products whatever this CPU's timings
    monkeypatch.setattr(packed_linear, "CALIBRATE_GAIN", 0.0)


def _packed(model):
    return sum(type(m) is PackedLinear for m in model.modules())


def test_replies_through_packed_weights_equal_offline_and_close_unpacks(every_size, causal_dir, adapter_dir):
    engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha", "beta": adapter_dir / "beta"},
                          limits=Limits(max_new_tokens=12, max_prompt_tokens=100), workers=2)
    try:
        assert engine.packed_weights and engine.packed_weights_note.startswith("on (")
        assert _packed(engine.model) > 0
        # adapters loaded on top wrap the packed layers as plain ones (the in-place LoRA add)
        engine.pool.add_start_adapter("gamma", adapter_dir / "gamma")
        layer = engine.model.get_submodule("model.layers.0.self_attn.q_proj")
        assert type(layer.base_layer) is PackedLinear and layer.plain_base
        jobs = [(f"job{i}", adapter, prompt, 10) for i, (adapter, prompt) in enumerate(
            (a, p) for a in ("alpha", "beta", "gamma", "base") for p in ("the film was", "a movie is very"))]
        events = []
        recorders = [submit(engine, *job, events) for job in jobs]
        for recorder, (name, adapter, prompt, max_tokens) in zip(recorders, jobs):
            assert recorder.finished.wait(60) and recorder.error is None, recorder.error
            assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt,
                                                      max_new_tokens=max_tokens), name
    finally:
        engine.close()
    assert _packed(engine.model) == 0 and not engine.packed_weights


def test_off_and_auto_without_anything_to_gain_leave_the_model(causal_dir):
    engine = build_engine(causal_dir, {}, packed_weights="off")
    try:
        assert not engine.packed_weights and engine.packed_weights_note == "off (--packed-weights off)"
    finally:
        engine.close()
    # the real threshold: a 32-wide model has no weight worth packing
    assert use_packed_weights(tiny_llama()) == (False, "off (no fp32 CPU linear weight large enough to gain)")
    with pytest.raises(ServingError, match="packed_weights must be one of auto, on, off"):
        build_engine(causal_dir, {}, packed_weights="yes")


def test_bf16_models_are_left_alone(every_size):
    model = tiny_llama().to(torch.bfloat16)
    assert not use_packed_weights(model)[0] and _packed(model) == 0


def test_auto_stays_off_when_the_copy_would_crowd_memory(every_size, monkeypatch):
    monkeypatch.setattr("lorakit.serving.packed_weights.available_bytes", lambda: 1000)
    model = tiny_llama()
    done, note = use_packed_weights(model, "auto")
    assert not done and "over half of the 0 MB available" in note and _packed(model) == 0
    assert use_packed_weights(model, "on")[0]  # on: the caller's word


def test_a_failing_or_differing_packed_forward_falls_back(every_size, monkeypatch, caplog):
    model = tiny_llama()
    ids = torch.randint(2, 90, (4, 1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits

    def broken(*args):
        raise RuntimeError("no oneDNN kernel")
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    done, note = use_packed_weights(model)
    assert not done and "no oneDNN kernel" in note and "no oneDNN kernel" in caplog.text and _packed(model) == 0
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda x, w, b, *rest: torch.zeros(x.shape[0], w.shape[0]), raising=False)
    done, note = use_packed_weights(model)
    assert not done and note == "off (they gave other logits for this model)" and _packed(model) == 0
    monkeypatch.undo()
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
