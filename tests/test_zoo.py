"""The architecture zoo against the real PEFT: for every family, "all-linear" selects PEFT's modules,
adapters cross both ways with equal outputs, merge / unmerge / unload keep the outputs and a mixed
batch equals per-adapter runs. Tiny random-init configs keep it fast."""

import copy
import warnings

import peft
import pytest
import torch

import lorakit as lk
from tests.helpers import perturb_trainable, run_arch
from tests.zoo import ZOO

warnings.filterwarnings("ignore", category=UserWarning)
ATOL = 1e-5
ARCHS = [pytest.param(arch, id=arch.name) for arch in ZOO]


def lorakit_model(base, arch, seed, name="default", model=None):
    model = model if model is not None else copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(**arch.config()), name)
    if model is not None and name != "default":
        lk.set_adapter(model, name)
    return perturb_trainable(model, seed)


def peft_model(base, arch, seed):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arch.config()))
    return perturb_trainable(model, seed)


def adapted_paths(model, prefix=""):
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules()
                  if isinstance(m, (lk.LoraLayer, peft.tuners.lora.LoraLayer)))


@pytest.fixture(scope="module")
def bases():
    cache = {}

    def get(arch):
        if arch.name not in cache:
            torch.manual_seed(0)
            cache[arch.name] = arch.build()
        return cache[arch.name]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_selects_what_peft_selects(arch, bases):
    base = bases(arch)
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**arch.config()))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arch.config()))
    assert adapted_paths(ours) == adapted_paths(theirs, "base_model.model.")
    assert adapted_paths(ours), "all-linear adapted nothing"


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_lorakit(arch, bases, tmp_path):
    base = bases(arch)
    theirs = peft_model(base, arch, seed=1)
    theirs.save_pretrained(tmp_path)
    expected = run_arch(theirs, arch)
    assert not torch.allclose(expected, run_arch(base, arch), atol=1e-3), "the adapter must change the output"
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run_arch(ours, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_adapter_loads_in_peft(arch, bases, tmp_path):
    base = bases(arch)
    ours = lorakit_model(base, arch, seed=2)
    lk.save_adapter(ours, tmp_path)
    expected = run_arch(ours, arch)
    assert not torch.allclose(expected, run_arch(base, arch), atol=1e-3), "the adapter must change the output"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run_arch(theirs, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_unload_keep_the_output(arch, bases):
    base = bases(arch)
    model = lorakit_model(base, arch, seed=3)
    adapted = run_arch(model, arch)
    lk.merge(model)
    torch.testing.assert_close(run_arch(model, arch), adapted, atol=ATOL, rtol=0)
    lk.unmerge(model)
    torch.testing.assert_close(run_arch(model, arch), adapted, atol=ATOL, rtol=0)
    plain = lk.unload(model)
    assert not any(isinstance(m, (lk.LoraLayer, lk.ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(run_arch(plain, arch), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_adapter_alone(arch, bases):
    base = bases(arch)
    model = lorakit_model(base, arch, seed=4, name="a")
    lorakit_model(base, arch, seed=5, name="b", model=model)
    names = ["a", "b", lk.BASE, "a"]
    with lk.mixed_batch(model, names):
        mixed = run_arch(model, arch)
    alone = {}
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        alone[name] = run_arch(model, arch)
    with lk.disable_adapters(model):
        alone[lk.BASE] = run_arch(model, arch)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=ATOL, rtol=0)
