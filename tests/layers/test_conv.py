"""LoRA and DoRA on convolutions (Conv1d/2d/3d, a transformers ResNet) against the real PEFT."""

import copy

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import lorakit as lk
from tests.helpers import perturb_trainable

ATOL = 1e-5


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), bias=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x1, x2, x3):
        return torch.cat([self.c1(x1).mean((-1,)), self.c2(x2).mean((-2, -1)), self.c3(x3).mean((-3, -2, -1)),
                          self.head(self.c2(x2).mean((-2, -1)))], dim=-1)


def convnet_inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 10, generator=gen), torch.randn(4, 3, 8, 8, generator=gen),
            torch.randn(4, 2, 2, 6, 6, generator=gen))


def resnet():
    config = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return tf.ResNetForImageClassification(config).eval()


def resnet_inputs():
    return (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


MODELS = {"convnet": (ConvNet, convnet_inputs, ["c1", "c2", "c3", "head"]),
          "resnet": (resnet, resnet_inputs, r".*convolution")}


def run_arch(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
        return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_conv_adapters_cross_with_peft_and_merge(name, use_dora, tmp_path):
    make, inputs, targets = MODELS[name]
    torch.manual_seed(0)
    base = make().eval()
    fields = dict(r=2, lora_alpha=4, target_modules=targets, use_dora=use_dora)
    theirs = perturb_trainable(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)), 1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run_arch(ours, inputs()), run_arch(theirs, inputs()), atol=ATOL, rtol=0)

    mine = perturb_trainable(lk.inject(copy.deepcopy(base), lk.LoraConfig(**fields)), 2)
    expected = run_arch(mine, inputs())
    assert not torch.allclose(expected, run_arch(base, inputs()), atol=1e-3)
    lk.save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run_arch(back, inputs()), expected, atol=ATOL, rtol=0)
    lk.merge(mine)
    torch.testing.assert_close(run_arch(mine, inputs()), expected, atol=ATOL, rtol=0)
    lk.unmerge(mine)
    torch.testing.assert_close(run_arch(lk.unload(mine), inputs()), expected, atol=ATOL, rtol=0)


def test_conv_layout_is_peft_s():
    model = lk.inject(ConvNet(), lk.LoraConfig(r=2, target_modules=["c2"], use_dora=True))
    layer = model.c2
    assert isinstance(layer.lora_A["default"], nn.Conv2d) and layer.lora_A["default"].stride == (2, 2)
    assert layer.lora_A["default"].weight.shape == (2, 3, 3, 3) and layer.lora_B["default"].weight.shape == (8, 2, 1, 1)
    assert layer.lora_magnitude_vector["default"].shape == (1, 8, 1, 1)


def test_mixed_batch_through_convolutions():
    torch.manual_seed(0)
    model = resnet()
    for name, dora in (("a", False), ("b", True)):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=r".*convolution", use_dora=dora), name)
        lk.set_adapter(model, name)
        perturb_trainable(model, 3 if dora else 4)
    names = ["a", "b", lk.BASE, "a"]
    with lk.mixed_batch(model, names):
        mixed = run_arch(model, resnet_inputs())
    for row, name in enumerate(names):
        if name == lk.BASE:
            with lk.disable_adapters(model):
                alone = run_arch(model, resnet_inputs())
        else:
            lk.set_adapter(model, name)
            alone = run_arch(model, resnet_inputs())
        torch.testing.assert_close(mixed[row], alone[row], atol=ATOL, rtol=0)


def test_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(lk.ConfigError, match="grouped convolution"):
        lk.inject(model, lk.LoraConfig(target_modules=["0"]))
