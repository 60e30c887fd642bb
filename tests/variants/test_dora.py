"""DoRA (use_dora=True) against the real PEFT: formats both ways, gradients, merge, mixed batches,
the 4-bit base, and bad input."""

import copy

import peft
import pytest
import torch

import lorakit as lk
from tests.helpers import perturb_trainable, run_arch
from tests.zoo import BY_NAME, ZOO

ATOL = 1e-5
# PEFT has no DoRA on parameters, and on transformers-v5 MoE models "all-linear" adapts the fused experts' parameters
DORA_ARCHS = [pytest.param(a, id=a.name) for a in ZOO if a.kind != "moe"]


@pytest.mark.parametrize("arch", [a for a in ZOO if a.kind == "moe"], ids=lambda a: a.name)
def test_dora_on_moe_all_linear_is_refused_as_peft_refuses_it(arch):
    torch.manual_seed(0)
    base = arch.build()
    with pytest.raises(ValueError, match="use_dora"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arch.config(use_dora=True)))
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(lk.ConfigError, match="target_parameters cannot use DoRA"):
        lk.inject(base, lk.LoraConfig(**arch.config(use_dora=True)))
    assert [n for n, _ in base.named_modules()] == before


@pytest.mark.parametrize("arch", DORA_ARCHS)
def test_dora_adapters_cross_both_ways_and_merge(arch, tmp_path):
    torch.manual_seed(0)
    base = arch.build()
    theirs = perturb_trainable(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arch.config(use_dora=True))), 1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run_arch(ours, arch), run_arch(theirs, arch), atol=ATOL, rtol=0)

    mine = perturb_trainable(lk.inject(copy.deepcopy(base), lk.LoraConfig(**arch.config(use_dora=True))), 2)
    expected = run_arch(mine, arch)
    lk.save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run_arch(back, arch), expected, atol=ATOL, rtol=0)
    lk.merge(mine)
    torch.testing.assert_close(run_arch(mine, arch), expected, atol=ATOL, rtol=0)
    lk.unmerge(mine)
    torch.testing.assert_close(run_arch(mine, arch), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(run_arch(lk.unload(mine), arch), expected, atol=ATOL, rtol=0)


def llama_pair(targets=("q_proj", "v_proj", "embed_tokens"), dropout=0.0):
    arch = BY_NAME["llama"]
    torch.manual_seed(0)
    base = arch.build()
    fields = dict(r=2, lora_alpha=4, target_modules=list(targets), use_dora=True, lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**fields))
    return arch, base, ours, theirs


def test_magnitude_starts_at_the_weight_norm_and_the_model_at_the_base():
    arch, base, ours, _ = llama_pair()
    q = ours.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_magnitude_vector["default"], q.base_layer.weight.norm(dim=1))
    emb = ours.model.embed_tokens
    torch.testing.assert_close(emb.lora_magnitude_vector["default"], emb.base_layer.weight.norm(dim=0))
    torch.testing.assert_close(run_arch(ours, arch), run_arch(base, arch), atol=1e-6, rtol=0)


def peft_name(name: str) -> str:
    return "base_model.model." + name.replace(".lora_magnitude_vector.default", ".lora_magnitude_vector.default.weight")


def same_adapter(ours, theirs, seed=3):
    """Give both models the same non-zero adapter (B and the embedding's A start at zero)."""
    theirs_params = dict(theirs.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
                theirs_params[peft_name(name)].copy_(p)
    return theirs_params


def test_gradients_equal_peft_with_the_norm_held_constant():
    arch, _, ours, theirs = llama_pair()
    theirs_params = same_adapter(ours, theirs)
    for model in (ours, theirs):
        model.train()
        ids = arch.inputs()["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs_params[peft_name(name)].grad, atol=1e-5, rtol=1e-4)


def test_dropout_recomputes_the_base_term_on_the_dropped_input():
    arch, _, ours, theirs = llama_pair(targets=("q_proj",), dropout=0.5)
    same_adapter(ours, theirs)
    outputs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model(**arch.inputs()).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)


def test_mixed_batch_with_dora_and_plain_rows():
    arch = BY_NAME["llama"]
    torch.manual_seed(0)
    model = arch.build()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True), "dora")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), "plain")
    perturb_trainable(model, 4)
    for name in ("dora", "plain"):  # the inactive adapter's weights need moving too
        lk.set_adapter(model, name)
        perturb_trainable(model, 5)
    names = ["dora", "plain", lk.BASE, "dora"]
    with lk.mixed_batch(model, names):
        mixed = run_arch(model, arch)
    for row, name in enumerate(names):
        if name == lk.BASE:
            with lk.disable_adapters(model):
                alone = run_arch(model, arch)
        else:
            lk.set_adapter(model, name)
            alone = run_arch(model, arch)
        torch.testing.assert_close(mixed[row], alone[row], atol=ATOL, rtol=0)


def test_qdora_on_a_4bit_base_merges_into_a_dequantized_copy():
    arch = BY_NAME["llama"]
    torch.manual_seed(0)
    model = lk.quantize(arch.build())
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    perturb_trainable(model, 6)
    adapted = run_arch(model, arch)
    plain = lk.unload(model, merge=True)
    torch.testing.assert_close(run_arch(plain, arch), adapted, atol=1e-4, rtol=0)


def test_a_magnitude_of_the_wrong_length_is_refused_and_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    arch, base, ours, _ = llama_pair(targets=("q_proj",))
    lk.save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = copy.deepcopy(base)
    with pytest.raises(lk.AdapterMismatchError, match=r"lora_magnitude_vector has shape \(15,\).*needs \(16,\)"):
        lk.load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, lk.LoraLayer) for m in fresh.modules())


def test_dora_is_refused_on_parameters():
    with pytest.raises(lk.ConfigError, match="target_parameters cannot use DoRA"):
        lk.LoraConfig(target_parameters=["down_proj"], use_dora=True)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_dora_path_equals_the_reference_formula(kind, p, monkeypatch):
    """The fused autograd path (no ΔW, norm from W0·Aᵀ and a Gram matrix) gives PEFT's outputs and
    gradients, dropout included (the same mask fed to both)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    import lorakit.kernels.dora as kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12))
    lk.inject(model, lk.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True, lora_dropout=p))
    layer = model[0].train()
    layer.base_layer.bias.requires_grad_(True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        layer.lora_magnitude_vector["default"].mul_(1.3)
    x = torch.randn(5, 7, 12, requires_grad=True)
    mask = (torch.rand(5, 7, 12) > p).to(torch.uint8)
    monkeypatch.setattr(kernels, "dropout_mask", lambda xc, prob: mask)
    weights = torch.linspace(-1, 1, 10)
    tensors = (x, *layer.adapter_parameters("default"), layer.base_layer.bias)

    def outputs_and_grads(forward):
        for t in tensors:
            t.grad = None
        y = forward()
        (y * weights).sum().backward()
        return [y.detach()] + [t.grad.clone() for t in tensors]

    calls = []
    real_apply = kernels.FusedDoraLinear.apply
    monkeypatch.setattr(kernels.FusedDoraLinear, "apply", lambda *a: calls.append(1) or real_apply(*a))
    fused = outputs_and_grads(lambda: layer(x))
    assert calls, "training a frozen base with one DoRA adapter goes through the fused path"

    class SameMask(nn.Module):
        def forward(self, z):
            return z * mask / (1 - p)

    if p:
        layer.lora_dropout["default"] = SameMask()
    variant = layer.variants["default"]  # the general (unfused) DoRA forward
    reference = outputs_and_grads(lambda: variant.add(layer, layer.base_layer(x), x, "default"))
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_inference_norm_cache_follows_weight_updates():
    arch, _, ours, _ = llama_pair(targets=("q_proj",))
    before = run_arch(ours, arch)
    assert torch.equal(run_arch(ours, arch), before)  # the cached norm gives the same result
    q = ours.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.add_(0.5)  # an optimizer step or a load bumps the version
    after = run_arch(ours, arch)
    q.variants["default"].norm_cache = None
    torch.testing.assert_close(after, run_arch(ours, arch), atol=0, rtol=0)  # equals a fresh computation
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_members_of_a_shared_input_share_one_projection_and_mask(p, monkeypatch):
    """q/k/v and gate/up DoRA members take their h from one A-projection and one dropout mask: the
    same loss and gradients as each layer on its own fed that mask, and 4 mask draws per block."""
    import lorakit.kernels.dora as dora_kernels
    import lorakit.kernels.lora as kernels
    from tests.helpers import tiny_llama

    draws = []

    def fixed_mask(x, prob):  # the same mask for the same input shape, wherever it is drawn
        draws.append(x.shape)
        generator = torch.Generator().manual_seed(x.numel())
        return (torch.rand(x.shape, generator=generator) >= prob).to(torch.uint8)

    monkeypatch.setattr(kernels, "dropout_mask", fixed_mask)
    monkeypatch.setattr(dora_kernels, "dropout_mask", fixed_mask)
    ids = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    def run_arch(grouped: bool):
        model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                      lora_dropout=p, init_lora_weights=False)).train()
        if not grouped:
            for module in model.modules():
                module.__dict__.pop("shared_input", None)
        draws.clear()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}, len(draws)

    calls = []
    real = dora_kernels.SharedDoraMember.apply
    monkeypatch.setattr(dora_kernels.SharedDoraMember, "apply", lambda *a: calls.append(1) or real(*a))
    loss_a, grads_a, draws_a = run_arch(True)
    assert len(calls) == 5 * 2  # q, k, v, gate, up in each of the 2 blocks
    loss_b, grads_b, draws_b = run_arch(False)
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name
    if p:
        assert (draws_a, draws_b) == (4 * 2, 7 * 2)


def test_mixed_batch_scales_are_kept_across_blocks_and_follow_changes():
    """A server enters a mixed batch at every step: DoRA's per-row scales are computed once and
    kept, and computed again when the magnitude or the base weight changes in place."""
    arch = BY_NAME["llama"]
    torch.manual_seed(0)
    model = arch.build()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True), "dora")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "plain")
    for name in ("dora", "plain"):
        lk.set_adapter(model, name)
        perturb_trainable(model, 5)
    model.eval()
    names = ["dora", "plain", "plain", "dora"]  # one per row of the architecture's inputs
    layer = next(m for m in model.modules() if isinstance(m, lk.LoraLayer))

    def mixed_and_scales():
        with torch.no_grad(), lk.mixed_batch(model, names, stack=["dora", "plain"]):
            return run_arch(model, arch), layer.mixed.scale_stack

    def alone(name):
        lk.set_adapter(model, name)
        with torch.no_grad():
            return run_arch(model, arch)
    first, scales = mixed_and_scales()
    assert mixed_and_scales()[1] is scales
    for change in (lambda: layer.base_layer.weight.add_(torch.randn_like(layer.base_layer.weight), alpha=0.1), lambda: layer.lora_magnitude_vector["dora"].mul_(1.5)):
        with torch.no_grad():
            change()
        changed, recomputed = mixed_and_scales()
        assert recomputed is not scales
        for row, name in enumerate(names):
            torch.testing.assert_close(changed[row], alone(name)[row], atol=ATOL, rtol=0)
        assert not torch.allclose(changed[0], first[0], atol=1e-4)
        first, scales = changed, recomputed
