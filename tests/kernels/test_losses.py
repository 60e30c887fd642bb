"""The chunked output projection + cross-entropy gives transformers' loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

import lorakit as lk
from lorakit.kernels.losses import IGNORE_INDEX, supports_chunked_loss
from tests.helpers import randomize_lora, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("chunk_rows", [5, 64], ids=["chunked", "one-chunk"])
def test_linear_cross_entropy_equals_the_full_logits_path(chunk_rows):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (23,), generator=generator)
    labels[[0, 7, 22]] = IGNORE_INDEX
    got = lk.linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    (2.5 * got).backward()  # a non-unit upstream gradient must scale both gradients
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
    (2.5 * want).backward()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)


def test_losses_beyond_fp32_probabilities_are_exact():
    """A target probability below fp32's range (loss > ~100) is taken as logsumexp - logit."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = 50 * torch.randn(6, 16, generator=generator), torch.randn(30, 16, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, IGNORE_INDEX, 5])
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
    assert want > 200
    assert torch.allclose(lk.linear_cross_entropy(hidden, weight, labels), want, rtol=1e-5)


def test_rows_without_labels_give_zero_loss_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = lk.linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any()


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="5 hidden rows but 4 labels"):
        lk.linear_cross_entropy(torch.randn(5, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))


def lora_llama(build=tiny_llama):
    model = lk.inject(build(), lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return randomize_lora(model, scale=0.1).train()


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 90, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :4] = IGNORE_INDEX  # a prompt that is not scored, as in SFT
    return ids, mask, labels


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_causal_lm_loss_equals_the_model_loss_and_gradients(build):
    model, (ids, mask, labels) = lora_llama(build).eval(), batch()  # eval: GPT-2's own dropout off
    assert supports_chunked_loss(model)
    want = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    got = loss_and_grads(model, lambda: lk.causal_lm_loss(model, ids, labels, attention_mask=mask))
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert got[1].keys() == want[1].keys() and any("lora_A" in n for n in got[1])
    for name, grad in want[1].items():
        assert torch.allclose(got[1][name], grad, atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_is_as_close_to_fp32_as_transformers_own_loss():
    model, (ids, mask, labels) = lora_llama(), batch()
    reference = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)

    def under_autocast(compute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compute()

    ours = loss_and_grads(model, lambda: under_autocast(lambda: lk.causal_lm_loss(model, ids, labels, mask)))
    theirs = loss_and_grads(model, lambda: under_autocast(
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss))
    for name, grad in reference[1].items():
        ours_error = (ours[1][name] - grad).norm() / grad.norm()
        theirs_error = (theirs[1][name] - grad).norm() / grad.norm()
        assert ours_error <= 2 * theirs_error + 1e-3, name


@pytest.mark.slow
def test_gradient_checkpointing_and_compile_give_the_same_loss_and_gradients():
    model, (ids, mask, labels) = lora_llama(), batch()
    eager = loss_and_grads(model, lambda: lk.causal_lm_loss(model, ids, labels, mask))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = loss_and_grads(model, lambda: lk.causal_lm_loss(model, ids, labels, mask))
    compiled_loss = torch.compile(lk.ChunkedLossLM(model), backend="aot_eager")
    compiled = loss_and_grads(model, lambda: compiled_loss(input_ids=ids, labels=labels, attention_mask=mask).loss)
    for other in (checkpointed, compiled):
        assert torch.allclose(other[0], eager[0], atol=1e-6)
        for name, grad in eager[1].items():
            assert torch.allclose(other[1][name], grad, atol=1e-6, rtol=1e-5), name


def test_models_with_another_head_take_the_model_own_loss():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=5.0))
    ids = torch.randint(2, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    assert not supports_chunked_loss(model)
    assert torch.equal(lk.causal_lm_loss(model, ids, ids), model(input_ids=ids, labels=ids).loss)
