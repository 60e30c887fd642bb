import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear


def single(module, r=4, alpha=8, init=True, dropout=0.0):
    model = nn.Sequential(module)
    lk.inject(model, lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init,
                                   lora_dropout=dropout))
    return model, model[0]


def test_linear_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    _, layer = single(base, init=False)
    A, B = layer.lora_pair("default")
    x = torch.randn(3, 5, 12)
    expected = x @ W0.T + b0 + (8 / 4) * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_init_true_is_kaiming_a_and_zero_b_so_output_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    x = torch.randn(2, 64)
    ref = base(x).detach()
    _, layer = single(base)
    A, B = layer.lora_pair("default")
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) on fan_in=64
    assert A.abs().max() <= bound and A.std() > bound / 4
    assert torch.equal(layer(x), ref)


def test_gaussian_init():
    _, layer = single(nn.Linear(64, 32), r=8, init="gaussian")
    A, B = layer.lora_pair("default")
    assert torch.count_nonzero(B) == 0
    assert A.std().item() == pytest.approx(1 / 8, rel=0.2)


def test_conv1d_is_handled_with_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=12)  # weight is in×out
    W0 = conv.weight.detach().clone()
    _, layer = single(conv, init=False)
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    A, B = layer.lora_pair("default")
    assert A.shape == (4, 12) and B.shape == (6, 4)
    x = torch.randn(2, 3, 12)
    expected = x @ W0 + conv.bias + 2.0 * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.delta_weight("default").shape == W0.shape


def test_embedding_lookup_then_project():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8)
    _, layer = single(emb, init=False)
    assert isinstance(layer, LoraEmbedding)
    A, B = layer.lora_pair("default")
    assert A.shape == (4, 20) and B.shape == (8, 4)
    ids = torch.tensor([[1, 5, 19]])
    expected = emb.weight[ids] + 2.0 * (A.T[ids] @ B.T)
    assert torch.allclose(layer(ids), expected, atol=1e-5)


def test_dropout_only_touches_the_lora_branch():
    """In training h = W0·x + s·B·A·dropout(x): the base term sees x whole, the LoRA term a dropped
    x (the same mask replayed from the seed); in eval mode nothing is dropped."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    model, layer = single(base, init=False, dropout=0.5)
    A, B = layer.lora_pair("default")
    x = torch.randn(4, 16)
    lora = lambda z: 2.0 * (z @ A.T @ B.T)  # noqa: E731 (s = alpha / r = 8 / 4)
    model.train()
    with lk.disable_adapters(model):
        assert torch.equal(layer(x), base(x))  # base path has no dropout
    torch.manual_seed(1)
    with torch.no_grad():  # the general path (the fused one draws its mask its own way: tests/kernels/test_kernels.py)
        out = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(out, base(x) + lora(dropped), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), out)  # another mask on the next call
    model.eval()
    torch.testing.assert_close(layer(x), base(x) + lora(x), atol=1e-5, rtol=1e-5)


def test_low_precision_base_keeps_fp32_adapters():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    _, layer = single(base, init=False)
    A, _ = layer.lora_pair("default")
    assert A.dtype == torch.float32
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_gradients_of_a_and_b_equal_peft_for_the_same_init():
    import peft

    from tests.helpers import tiny_llama

    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               init_lora_weights=False))
    ours = lk.inject(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():  # same A and B in both
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                ours_params[name.removeprefix("base_model.model.")].copy_(p)
    for model in (ours, theirs):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            mine = ours_params[name.removeprefix("base_model.model.")].grad
            assert torch.allclose(mine, p.grad, rtol=1e-5, atol=1e-7), name


def test_a_wrapped_layer_answers_its_base_layers_attributes():
    """Model code reads .weight / .bias / .in_features of the modules it owns (T5: wo.weight.dtype)."""
    from torch import nn

    import lorakit as lk

    model = nn.Sequential(nn.Linear(4, 3))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    wrapped = model[0]
    assert isinstance(wrapped, lk.LoraLinear)
    assert wrapped.weight is wrapped.base_layer.weight and wrapped.bias is wrapped.base_layer.bias
    assert (wrapped.in_features, wrapped.out_features, wrapped.weight.dtype) == (4, 3, torch.float32)
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
