"""The chunked per-token log-probabilities against log_softmax over the model's own logits."""

import pytest
import torch

import lorakit as lk
from lorakit.kernels.logprobs import linear_logprobs, shifted_targets
from tests.helpers import VOCAB, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_match_log_softmax_with_grads(temperature):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    ours = linear_logprobs(hidden, weight, targets, temperature, chunk_rows=8)
    (ours * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = torch.log_softmax(hidden @ weight.t() / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_token_logprobs_equal_the_models_logits_and_skip_prompt_rows(build):
    model = build()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if build is tiny_llama else ["c_attn"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(2, VOCAB, (3, 12))
    completion = torch.zeros_like(ids)
    completion[:, 7:] = 1
    completion[2, 10:] = 0  # a shorter completion (the rest is padding)
    targets = shifted_targets(ids, completion)
    ours = lk.token_logprobs(model, ids, None, targets)
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    ref = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours[:, :6] == 0).all() and (ours[2, 9:] == 0).all() and (ours[0, 6:11] != 0).all() and (ours[:, 11] == 0).all()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)
