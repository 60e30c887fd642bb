"""PackedLinear: the products of torch's F.linear through oneDNN's packed weights, never a stale
copy, gradients through torch's own path, and a model that copies, saves and unpacks as before."""

import copy
import io

import pytest
import torch
from torch import nn

from lorakit.kernels import packed_linear
from lorakit.kernels.packed_linear import PackedLinear, pack_linears, packable, packed_elements, unpack_linears
from tests.helpers import tiny_llama

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="torch built without oneDNN")


@pytest.fixture
def every_size(monkeypatch):
    """Pack the tiny test weights too (the real threshold leaves them to F.linear)."""
    monkeypatch.setattr(packed_linear, "SMALL_WEIGHT", 1)


def _linear(bias=True, fan_in=48, fan_out=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (2, 5, 48), (16, 1, 48), (300, 48)])
def test_products_equal_f_linear_inside_and_outside_the_packed_rows(every_size, bias, shape):
    linear = _linear(bias)
    x = torch.randn(*shape)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    pack_linears(linear)
    assert type(linear) is PackedLinear
    with torch.inference_mode():
        got = linear(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_packed_path_is_taken_for_a_few_rows(every_size, monkeypatch):
    linear = _linear()
    pack_linears(linear)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    with torch.inference_mode():
        linear(torch.randn(4, 1, 48))     # a decoding step of 4 rows: packed
        linear(torch.randn(1, 400, 48))   # a prefill: torch's path
    assert calls == [(4, 48)]


def test_a_changed_weight_is_repacked_never_read_stale(every_size):
    linear = _linear()
    pack_linears(linear)
    x = torch.randn(4, 48)
    with torch.inference_mode():
        linear(x)
    with torch.no_grad():
        linear.weight.add_(1.0)  # a merge writes the base weight in place
    with torch.inference_mode():
        got = linear(x)
    torch.testing.assert_close(got, nn.functional.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        linear.weight = nn.Parameter(torch.zeros_like(linear.weight))  # a new tensor in its place
    with torch.inference_mode():
        torch.testing.assert_close(linear(x), linear.bias.expand(4, -1), atol=1e-6, rtol=0)


def test_gradients_go_through_torch_linear(every_size):
    linear = _linear()
    pack_linears(linear)
    x = torch.randn(4, 48, requires_grad=True)
    linear(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(4, -1))
    assert linear.weight.grad is not None


def test_which_modules_are_packed():
    assert packable(nn.Linear(1024, 256))                                  # 256K weight elements
    assert not packable(nn.Linear(576, 192))                               # thin: oneDNN's call cost loses
    assert not packable(nn.Linear(1024, 256, dtype=torch.bfloat16))        # measured in fp32 only
    assert not packable(type("Mine", (nn.Linear,), {})(1024, 256))         # a subclass has its own forward
    model = nn.Sequential(nn.Linear(1024, 256), nn.Linear(256, 16))
    assert packed_elements(model) == 1024 * 256 and pack_linears(model) == 1024 * 256
    assert [type(m) for m in model] == [PackedLinear, nn.Linear]
    assert model[0].packed_steps == {2, 4, 8}                             # the fixed rule's ROWS
    head = nn.Linear(1024, 8 * 2**10)
    pack_linears(head)
    assert head.packed_steps == {1, 2, 4, 8, 16, 32, 64, 128}             # LARGE_ROWS


def test_row_counts_go_by_the_step_at_or_above_them():
    assert [packed_linear.row_step(r) for r in (0, 1, 2, 3, 4, 5, 9, 500, 512, 513, 5000)] == \
        [1, 1, 2, 4, 4, 8, 16, 512, 512, 512, 512]


def test_calibration_keeps_the_steps_where_packed_measured_faster(monkeypatch):
    # the second is under the fixed rule's size but measured; the third too small even to measure
    model = nn.Sequential(nn.Linear(1024, 256), nn.Linear(576, 192), nn.Linear(256, 16))
    state = torch.get_rng_state()
    steps = packed_linear.calibrate(model, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator untouched (sampling seeds)
    assert set(steps) == {(1024, 256), (576, 192)} and steps[(1024, 256)] <= set(packed_linear.ROW_STEPS)
    pack_linears(model, steps={(1024, 256): frozenset({4}), (576, 192): frozenset()})
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, nn.Linear]  # no steps: left plain
    unpack_linears(model)
    # a packed product that takes far longer than F.linear is never chosen
    real = torch.ops.mkldnn._linear_pointwise
    slow = lambda *a: [real(*a) for _ in range(20)][-1]  # noqa: E731
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise", slow, raising=False)
    assert packed_linear.calibrate(model, repeats=1) == {(1024, 256): frozenset(), (576, 192): frozenset()}
    pack_linears(model, steps={(1024, 256): frozenset({4}), (576, 192): frozenset({2})})
    assert model[0].packed_steps == {4} and model[1].packed_steps == {2}
    assert packed_linear.set_packed_steps(model, {(1024, 256): frozenset({8})}) == 1024 * 256
    assert model[0].packed_steps == {8} and type(model[1]) is nn.Linear  # no steps left: unpacked


def test_a_packed_model_copies_saves_and_unpacks_as_before(every_size):
    model = tiny_llama()
    ids = torch.randint(2, 90, (3, 1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    keys = list(model.state_dict())
    assert pack_linears(model) > 0
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    clone = copy.deepcopy(model)  # oneDNN's opaque copy stays behind; the clone packs its own
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        for other in (clone, loaded):
            torch.testing.assert_close(other(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    unpack_linears(model)
    assert not any(type(m) is PackedLinear for m in model.modules())
    assert not any("_packed" in m.__dict__ for m in model.modules())


def test_a_packed_module_converted_to_bf16_takes_torch_path(every_size):
    linear = _linear()
    pack_linears(linear)
    linear.to(torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x), nn.functional.linear(x, linear.weight, linear.bias))
