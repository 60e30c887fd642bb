"""The fused autograd path gives the general path's outputs and gradients."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.kernels import lora as kernels
from lorakit.kernels.lora import FusedLoraLinear
from tests.helpers import randomize_lora, tiny_llama


def layer_pair(base, dropout=0.0, bias="none"):
    model = nn.Sequential(base)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], bias=bias))
    randomize_lora(model, scale=0.2)
    return model


def grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, named


@pytest.mark.parametrize("base", [nn.Linear(12, 6), Conv1D(6, 12)], ids=["linear", "conv1d"])
def test_fused_equals_general_path(base, monkeypatch):
    model = layer_pair(base, bias="lora_only")
    x = torch.randn(3, 5, 12)
    calls = []
    real = FusedLoraLinear.apply
    monkeypatch.setattr(FusedLoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fused = grads(model, x)
    assert calls, "the fused path was not taken"
    monkeypatch.setattr(type(model[0]), "fused_adapter", lambda self, *a: None)
    general = grads(model, x)
    for got, want in zip(fused[:2], general[:2]):
        assert torch.allclose(got, want, atol=1e-6)
    assert fused[2].keys() == general[2].keys() and "0.base_layer.bias" in fused[2]
    for name in fused[2]:
        assert torch.allclose(fused[2][name], general[2][name], atol=1e-6), name


def test_dropout_uses_a_mask_on_the_lora_branch_only(monkeypatch):
    torch.manual_seed(0)
    model = layer_pair(nn.Linear(12, 6), dropout=0.3).train()
    layer = model[0]
    x = torch.randn(4, 12, requires_grad=True)
    u = torch.rand(4, 12)
    monkeypatch.setattr(kernels, "dropout_mask", lambda t, p: (u >= p).to(torch.uint8))
    out = model(x)
    out.sum().backward()
    A, B = (p.detach().clone().requires_grad_(True) for p in layer.lora_pair("default"))
    x_ref = x.detach().clone().requires_grad_(True)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    ref = x_ref @ W.T + b + 2.0 * ((x_ref * (u >= 0.3) / 0.7) @ A.T) @ B.T
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(layer.lora_A["default"].weight.grad, A.grad, atol=1e-6)
    assert torch.allclose(layer.lora_B["default"].weight.grad, B.grad, atol=1e-6)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lora_llama():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return randomize_lora(model, scale=0.1).train()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    model = lora_llama()
    eager = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = loss_and_grads(model, ids)
    assert torch.allclose(eager[0], checkpointed[0], atol=1e-6)
    assert eager[1].keys() == checkpointed[1].keys() and eager[1]
    for name, grad in eager[1].items():
        assert torch.allclose(grad, checkpointed[1][name], atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_gives_the_same_loss_and_gradients(backend):
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    model = lora_llama()
    eager = loss_and_grads(model, ids)
    compiled = torch.compile(model, backend=backend)  # graph capture incl. the autograd.Function
    model.zero_grad(set_to_none=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.allclose(eager[0], loss.detach(), atol=1e-5)
    for name, param in model.named_parameters():
        if name in eager[1]:
            assert torch.allclose(eager[1][name], param.grad, atol=1e-5), name


def test_shared_input_groups_compute_q_k_v_and_gate_up_together(monkeypatch):
    """The grouped path gives the per-layer results (outputs and every gradient) and draws one
    dropout mask per shared input: 4 per Llama block (q/k/v, o, gate/up, down) instead of 7."""
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    grouped = lora_llama()
    q_proj = grouped.model.layers[0].self_attn.q_proj
    assert q_proj.shared_input is grouped.model.layers[0].self_attn.v_proj.shared_input
    assert getattr(grouped.model.layers[0].self_attn.o_proj, "shared_input", None) is None
    separate = lora_llama()
    for module in separate.modules():
        module.__dict__.pop("shared_input", None)
    loss_a, grads_a = loss_and_grads(grouped, ids)
    loss_b, grads_b = loss_and_grads(separate, ids)
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name

    draws = []
    real = kernels.dropout_mask
    monkeypatch.setattr(kernels, "dropout_mask", lambda x, p: draws.append(x.shape) or real(x, p))
    dropped = lk.inject(tiny_llama(), lk.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")).train()
    dropped(input_ids=ids, labels=ids).loss.backward()
    assert len(draws) == 4 * len(dropped.model.layers)


@pytest.mark.parametrize("mode", ["autocast", "bf16 base"])
def test_fused_path_in_bf16_matches_the_general_path(mode, monkeypatch):
    """bf16 autocast over an fp32 model, or a bf16 base with fp32 LoRA weights: the fused and
    grouped paths give the general path's loss and (fp32) LoRA gradients to bf16 precision."""
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(fused: bool):
        model = lora_llama()
        if mode == "bf16 base":
            lk.cast_base(model, torch.bfloat16)
        if not fused:
            monkeypatch.setattr(lk.LoraLinear, "fused_adapter", lambda *a, **k: None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monkeypatch.undo()
        return loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss_fused, grads_fused = run(True)
    loss_general, grads_general = run(False)
    assert abs(loss_fused - loss_general) < 2e-2 * abs(loss_general)
    assert grads_fused.keys() == grads_general.keys()
    for name, grad in grads_fused.items():
        assert grad.dtype == torch.float32, name
        ref = grads_general[name]
        assert (grad - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_keeps_one_minus_p_in_every_position(p):
    """16 random bits per element come 4 to an int64 draw: every one of the 4 positions must be fair."""
    torch.manual_seed(0)
    mask = kernels.dropout_mask(torch.empty(4000, 256), p)
    assert mask.dtype == torch.uint8 and mask.shape == (4000, 256) and set(mask.unique().tolist()) == {0, 1}
    by_position = mask.reshape(-1, 4).float().mean(0)
    assert torch.allclose(by_position, torch.full((4,), 1 - p), atol=0.003), by_position
    torch.manual_seed(0)
    assert torch.equal(kernels.dropout_mask(torch.empty(4000, 256), p), mask)  # follows torch.manual_seed
    assert not torch.equal(kernels.dropout_mask(torch.empty(4000, 256), p), mask)
    assert kernels.dropout_mask(torch.empty(3, 7), p).shape == (3, 7)  # sizes not a multiple of 4
