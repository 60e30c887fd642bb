"""What lk.mixed_batch and lk.disable_adapters set belongs to the thread that set it: two threads
running forwards of one model at once (a server's workers) each get their own rows' adapters."""

import threading

import pytest
import torch

import lorakit as lk
from tests.helpers import VOCAB, randomize_lora, tiny_llama


def two_adapter_model():
    model = tiny_llama()
    config = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                           modules_to_save=["lm_head"], trainable_token_indices=[3, 5])
    lk.inject(model, config, adapter_name="a")
    lk.inject(model, config, adapter_name="b")
    randomize_lora(model, seed=1)
    for name, param in model.named_parameters():  # the saved heads and token rows differ per adapter too
        if "modules_to_save" in name or "trainable_tokens_delta" in name:
            with torch.no_grad():
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def test_two_threads_in_different_blocks_each_get_their_own_adapters():
    model = two_adapter_model()
    ids = torch.randint(2, VOCAB, (2, 6))
    ids[:, 0] = 3  # a trainable token in every row
    blocks = {
        "mixed": lambda: lk.mixed_batch(model, ["a", "b"]),
        "mixed, swapped": lambda: lk.mixed_batch(model, ["b", "a"]),
        "disabled": lambda: lk.disable_adapters(model),
    }
    expected = {}
    with torch.no_grad():
        for name, block in blocks.items():
            with block():
                expected[name] = model(input_ids=ids).logits
    assert not torch.allclose(expected["mixed"], expected["mixed, swapped"])
    assert not torch.allclose(expected["mixed"], expected["disabled"])

    # every thread enters its block, waits until all are inside, then runs several forwards
    inside = threading.Barrier(len(blocks))
    got, errors = {}, []

    def run(name):
        try:
            with torch.no_grad(), blocks[name]():
                inside.wait(timeout=30)
                got[name] = [model(input_ids=ids).logits for _ in range(5)]
                inside.wait(timeout=30)  # nobody leaves its block before all forwards are done
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in blocks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for name in blocks:
        for out in got[name]:
            torch.testing.assert_close(out, expected[name], rtol=0, atol=0)


def test_a_block_in_one_thread_leaves_the_others_on_the_active_adapter():
    model = two_adapter_model()
    ids = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        active = model(input_ids=ids).logits
    seen, entered, done = {}, threading.Event(), threading.Event()

    def other_thread():
        entered.wait(30)
        with torch.no_grad():
            seen["out"] = model(input_ids=ids).logits
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with lk.disable_adapters(model):
        entered.set()
        assert done.wait(30)
    thread.join()
    torch.testing.assert_close(seen["out"], active, rtol=0, atol=0)


def test_assign_sets_only_per_thread_attributes():
    """assign goes straight to the descriptor, so it refuses a name that is not a PerThread one
    (a plain attribute set that way would skip nn.Module's bookkeeping)."""
    from lorakit.layers.per_thread import assign

    layer = lk.LoraLayer(torch.nn.Linear(2, 2))
    assign(layer, "disabled", True)
    assert layer.disabled is True
    assign(layer, "disabled", False)
    assert layer.disabled is False
    with pytest.raises(TypeError, match="not a PerThread"):
        assign(layer, "training", False)
