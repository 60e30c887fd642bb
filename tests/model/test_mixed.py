import contextlib

import pytest
import torch

import lorakit as lk
from tests.helpers import FAMILIES, logits, needs_compiler, randomize_lora, tiny_bert, tiny_llama


def three_adapters(family):
    make, targets = FAMILIES[family]
    model = make()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets), "a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=targets[:2]), "b")
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=8, target_modules=targets[1:]), "c")
    return randomize_lora(model, scale=0.3)


def per_adapter(model, ids, name):
    if name == lk.BASE:
        with lk.disable_adapters(model):
            return logits(model, ids)
    lk.set_adapter(model, name)
    return logits(model, ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_row_equals_running_its_adapter_alone(family, ids):
    model = three_adapters(family)
    names = ["a", "b", lk.BASE, "c"]
    with lk.mixed_batch(model, names):
        mixed = logits(model, ids)
    for row, name in enumerate(names):
        alone = per_adapter(model, ids, name)
        assert torch.allclose(mixed[row], alone[row], atol=1e-5), (family, name)


def test_mixed_batch_has_no_python_loop_over_adapters(ids, monkeypatch):
    """The LoRA layers make exactly two batched matmuls however many adapters are mixed."""
    model = three_adapters("llama")
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real_bmm(*a, **k))
    with lk.mixed_batch(model, ["a", "b", "c", "a"]):
        logits(model, ids)
    n_layers = sum(1 for m in model.modules() if isinstance(m, lk.LoraLayer))
    assert len(calls) == n_layers  # one bmm per layer (x·A; B is fused into baddbmm), not one per adapter


def test_mixed_generate_matches_single_adapter_generate():
    model = three_adapters("llama")
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    names = ["a", lk.BASE, "c"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    with lk.mixed_batch(model, names), torch.no_grad():
        mixed = model.generate(prompt, **kwargs)
    for row, name in enumerate(names):
        if name == lk.BASE:
            with lk.disable_adapters(model), torch.no_grad():
                alone = model.generate(prompt[row:row + 1], **kwargs)
        else:
            lk.set_adapter(model, name)
            with torch.no_grad():
                alone = model.generate(prompt[row:row + 1], **kwargs)
        assert torch.equal(mixed[row], alone[0])


def test_beams_repeat_rows():
    model = three_adapters("llama")
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with lk.mixed_batch(model, ["a", "c"]), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=1)
    assert out.shape == (2, 7)


def test_mixed_classifier_heads_per_row(ids):
    model = tiny_bert()
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"), name)
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.modules_to_save["b"].weight.mul_(-3)
    names = ["b", "a", "a", "b"]
    with lk.mixed_batch(model, names):
        mixed = logits(model, ids)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], per_adapter(model, ids, name)[row], atol=1e-5)


def test_bad_mixed_batches():
    model = three_adapters("llama")
    ids = torch.randint(2, 90, (4, 5))
    with pytest.raises(lk.LoraError, match="3 adapter names but the batch has 4 rows"):
        with lk.mixed_batch(model, ["a", "b", "c"]):
            logits(model, ids)
    with pytest.raises(lk.LoraError, match="one adapter name per batch row; got an empty list") as empty:
        with lk.mixed_batch(model, []):
            pass
    assert not isinstance(empty.value, lk.MergeStateError)
    with pytest.raises(lk.AdapterNotFoundError, match="unknown adapter 'zzz'"):
        with lk.mixed_batch(model, ["a", "zzz", "c", "a"]):
            pass
    lk.merge(model)
    with pytest.raises(lk.MergeStateError, match="unmerge"):
        with lk.mixed_batch(model, ["a", "b", "c", "a"]):
            pass


def test_state_is_restored_after_the_block(ids):
    model = three_adapters("llama")
    before = logits(model, ids)
    try:
        with lk.mixed_batch(model, ["b", "b", "b", "b"]):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.equal(logits(model, ids), before)


def test_stacks_follow_weight_updates_and_readded_adapters(ids):
    model = three_adapters("llama")
    names = ["a", "a", "b", "b"]
    with lk.mixed_batch(model, names):
        first = logits(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["a"].weight.add_(1.0)  # an optimizer-like update
    with lk.mixed_batch(model, names):
        second = logits(model, ids)
    assert not torch.allclose(first[0], second[0]) and torch.allclose(first[2], second[2])
    assert torch.allclose(second[0], per_adapter(model, ids, "a")[0], atol=1e-5)
    lk.delete_adapter(model, "b")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]), "b")
    with lk.mixed_batch(model, names):
        third = logits(model, ids)
    assert torch.allclose(third[2], per_adapter(model, ids, "b")[2], atol=1e-5)


@pytest.mark.parametrize("tracked", [True, False], ids=["version counters", "inference tensors"])
def test_stacks_built_while_an_adapter_is_overwritten_are_built_again(tracked):
    """A server writes an idle adapter's values while another thread builds the stacks (a hot swap
    beside forwards): the stacks that read the old values are not kept past the swap's end."""
    # adapters loaded under inference mode have no version counters to notice the write
    with contextlib.nullcontext() if tracked else torch.inference_mode():
        model = three_adapters("llama")
    layer = model.model.layers[0].self_attn.q_proj
    names = ["a", "b"]
    build = layer._build_stacks

    def build_then_swap(slot_names, present):
        stacks = build(slot_names, present)  # the old values of b read
        with torch.inference_mode() if not tracked else torch.no_grad():  # the swap writes b, then ends
            layer.lora_pair("b")[1].add_(1.0)
        layer.clear_mixed_cache()
        return stacks

    layer._build_stacks = build_then_swap
    stale = layer.mixed_stacks(names)
    del layer._build_stacks
    fresh = layer.mixed_stacks(names)
    A, B = layer.factors("b")
    assert fresh is not stale
    assert torch.equal(fresh.B[2, :B.shape[1]], (B.t() * layer.scaling["b"]).to(fresh.B.dtype))
    assert layer.mixed_stacks(names) is fresh  # and kept from then on


def test_layers_without_any_of_the_blocks_adapters_stay_base(ids):
    model = three_adapters("llama")  # "b" adapts only q_proj and k_proj, "c" everything but q_proj
    names = ["b", lk.BASE, "b", "b"]  # v_proj, o_proj, gate_proj, embed_tokens hold no "b"
    with lk.mixed_batch(model, names):
        mixed = logits(model, ids)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], per_adapter(model, ids, name)[row], atol=1e-5)


def test_a_fixed_stack_serves_changing_rows_with_one_set_of_stacks(ids):
    """stack= (a server's loaded adapters) keeps the stacks across blocks whose rows name different
    subsets; the outputs stay those of each row's adapter."""
    model = three_adapters("llama")
    layer = next(m for m in model.modules() if isinstance(m, lk.LoraLayer))
    built = []
    for names in (["a", "b", "a", lk.BASE], ["c", "c", lk.BASE, "b"]):
        with lk.mixed_batch(model, names, stack=["a", "b", "c"]):
            mixed = logits(model, ids)
            built.append(layer.mixed.A_stack)
        for row, name in enumerate(names):
            assert torch.allclose(mixed[row], per_adapter(model, ids, name)[row], atol=1e-5), name
    assert built[0] is built[1]
    with pytest.raises(lk.LoraError, match="not in stack"):
        with lk.mixed_batch(model, ["a", "c", "a", "a"], stack=["a", "b"]):
            pass


def test_one_token_rows_multiply_by_all_adapters_at_once_and_match_the_gather():
    """Decoding steps (one token per row) take the concatenated path: equal to each adapter alone."""
    from lorakit.model import mixed as mixed_module

    model = tiny_llama(seed=3)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    randomize_lora(model, scale=0.5, seed=1)
    model.eval()
    names = ["a", "__base__", "b", "a"]
    ids = torch.randint(0, 64, (len(names), 1))
    calls = []
    original = mixed_module.MixedRows.concatenated

    def counted(self, batch, dtype):
        result = original(self, batch, dtype)
        calls.append(result is not None)
        return result
    with torch.no_grad():
        mixed_module.MixedRows.concatenated = counted
        try:
            with lk.mixed_batch(model, names):
                together = model(input_ids=ids).logits
        finally:
            mixed_module.MixedRows.concatenated = original
        for row, name in enumerate(names):
            if name == "__base__":
                with lk.disable_adapters(model):
                    alone = model(input_ids=ids[row:row + 1]).logits
            else:
                lk.set_adapter(model, name)
                alone = model(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert calls and all(calls)


def test_wrappers_found_once_follow_every_change_of_structure(ids):
    """The wrappers a mixed batch and disable_adapters act on are looked up once and kept until
    a wrapper comes or goes: an adapter on new modules, an unload, a new injection all show."""
    torch.manual_seed(0)
    model = tiny_llama()
    base = logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), "a")
    randomize_lora(model, scale=0.3)
    with lk.mixed_batch(model, ["a"] * ids.shape[0]):  # the list of wrappers is now kept
        logits(model, ids)
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]), "b")  # new wrappers
    randomize_lora(model, scale=0.3, seed=11)
    lk.set_adapter(model, "b")
    alone = logits(model, ids)
    assert not torch.allclose(alone, base, atol=1e-3)
    with lk.mixed_batch(model, ["b"] * ids.shape[0]):
        assert torch.allclose(logits(model, ids), alone, atol=1e-5)
    with lk.disable_adapters(model):  # v_proj's new layers switched off too
        assert torch.allclose(logits(model, ids), base, atol=1e-6)
    plain = lk.unload(model, merge=False)
    assert torch.allclose(logits(plain, ids), base, atol=1e-6)
    lk.inject(plain, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]), "c")
    randomize_lora(plain, scale=0.3, seed=12)
    with lk.disable_adapters(plain):  # the new k_proj layers, not the unloaded ones
        assert torch.allclose(logits(plain, ids), base, atol=1e-6)


def test_one_token_rows_over_layers_of_different_ranks(ids):
    """Decoding steps share each row mask between layers of the same width only: here q_proj
    stacks rank 4 at most and the other projections rank 8, and every row still equals its adapter."""
    model = three_adapters("llama")
    model.eval()
    names = ["c", "a", lk.BASE, "b"]
    step = ids[:, :1]
    with torch.no_grad(), lk.mixed_batch(model, names, stack=["a", "b", "c"]):
        together = model(input_ids=step).logits
    with torch.no_grad():
        for row, name in enumerate(names):
            torch.testing.assert_close(together[row], per_adapter(model, step, name)[row], atol=1e-5, rtol=1e-5)


def test_adapters_made_under_inference_mode_serve_mixed_batches(ids):
    """Tensors created under torch.inference_mode have no version counter; the stacks cache (and
    DoRA's norm caches) must not read one. Everything here happens in inference mode."""
    with torch.inference_mode():
        model = tiny_llama(seed=4)
        lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), "a")
        lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True), "d")
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.3)
        model.eval()
        names = ["a", "d", lk.BASE, "a"]
        for _ in range(2):  # the second block reuses the kept stacks
            with lk.mixed_batch(model, names, stack=["a", "d"]):
                together = logits(model, ids)
        for row, name in enumerate(names):
            torch.testing.assert_close(together[row], per_adapter(model, ids, name)[row], atol=1e-5, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_token_rows_through_the_lora_kernel_equal_each_adapter_alone(ids, tmp_path, dtype, monkeypatch):
    """lk.mixed_batch(kernel=...): one-token rows take the kernel (and not the GEMMs), longer
    forwards keep torch's path; every row equals its adapter alone."""
    from lorakit.kernels.mixed_lora import MixedLora, load
    from lorakit.model import mixed as mixed_module

    kernel, how = load(str(tmp_path))
    assert kernel is not None, how
    model = three_adapters("llama").to(dtype)
    model.eval()
    names = ["c", "a", lk.BASE, "b"]
    calls = {"kernel": 0, "gemms": 0}
    add, concatenated = MixedLora.add, mixed_module.MixedRows.concatenated

    def counted_add(self, *args):
        calls["kernel"] += 1
        return add(self, *args)

    def counted_gemms(self, *args):
        calls["gemms"] += 1
        return concatenated(self, *args)
    monkeypatch.setattr(MixedLora, "add", counted_add)
    monkeypatch.setattr(mixed_module.MixedRows, "concatenated", counted_gemms)
    with torch.no_grad():
        step = ids[:, :1]
        with lk.mixed_batch(model, names, stack=["a", "b", "c"], kernel=kernel):
            through_kernel = model(input_ids=step).logits
        assert calls == {"kernel": calls["kernel"], "gemms": 0} and calls["kernel"] > 0
        with lk.mixed_batch(model, names, stack=["a", "b", "c"]):
            through_gemms = model(input_ids=step).logits
        with lk.mixed_batch(model, names, stack=["a", "b", "c"], kernel=kernel):
            kernel_calls = calls["kernel"]
            longer = model(input_ids=ids).logits  # several tokens a row: the gather, not the kernel
            assert calls["kernel"] == kernel_calls
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(through_kernel, through_gemms, **tolerance)
    with torch.no_grad():
        for row, name in enumerate(names):
            torch.testing.assert_close(through_kernel[row], per_adapter(model, step, name)[row], **tolerance)
            torch.testing.assert_close(longer[row], per_adapter(model, ids, name)[row], **tolerance)
