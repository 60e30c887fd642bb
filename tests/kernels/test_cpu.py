"""bf16 products on a CPU without a bf16 unit run in fp32 (kernels/cpu.py): every matrix product the
4-bit layer, the chunked loss and a bf16 base under LoRA run, forward and backward, under the
training loop's autocast, sees fp32 operands there, and plain bf16 ones where the CPU has the unit;
results equal torch's own bf16 products up to bf16 rounding."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.kernels import cpu
from lorakit.kernels.lora import FusedLoraLinear, SharedMemberOutput
from lorakit.kernels.losses import linear_cross_entropy
from lorakit.kernels.nf4 import Linear4bit

PRODUCTS = {getattr(op, overload) for op in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm)
            for overload in ("default", "out")}  # out: a product written into a given tensor


class ProductDtypes(TorchDispatchMode):
    """The operand dtypes of every matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.append({a.dtype for a in tensors})
            self.shapes.append([tuple(a.shape) for a in tensors])
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=[False, True], ids=["emulated bf16", "native bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(cpu, "_this_cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_a_bf16_product_runs_in_fp32_only_where_bf16_is_emulated(native):
    torch.manual_seed(0)
    a, b = torch.randn(5, 7, 48).bfloat16(), torch.randn(48, 24).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), ProductDtypes() as products:
        got = cpu.matmul(a, b)
    assert got.dtype == torch.bfloat16
    assert products.seen and all(s == {torch.bfloat16 if native else torch.float32} for s in products.seen)
    torch.testing.assert_close(got, a @ b, atol=0, rtol=2 ** -7)  # one bf16 rounding apart at most
    assert torch.equal(cpu.matmul(a.float(), b.float()), a.float() @ b.float())  # fp32: untouched


def test_the_4bit_base_and_the_chunked_loss_multiply_as_the_cpu_does(native):
    """A QLoRA step's big products: the 4-bit layer's forward and its input gradient, the LM head's
    logits and their gradient, under the training loop's autocast."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 96, bias=False), compute_dtype=torch.bfloat16)
    head = torch.randn(200, 96).bfloat16()
    x = torch.randn(2, 6, 64, requires_grad=True)
    labels = torch.randint(0, 200, (2, 6))
    with ProductDtypes() as products:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(layer(x), head, labels)
        loss.backward()
    assert len(products.seen) >= 4 and all(s == {torch.bfloat16 if native else torch.float32}
                                          for s in products.seen), products.seen
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kernel", ["fused", "shared input"])
def test_a_bf16_base_under_lora_multiplies_as_the_cpu_does(native, kernel):
    """The frozen bf16 base's products inside the fused LoRA paths (kernels/lora.py), forward and
    input gradient; the r-wide LoRA products are left to torch."""
    torch.manual_seed(0)
    r, x = 4, torch.randn(3, 5, 64, requires_grad=True)
    weight, A, B = torch.randn(96, 64).bfloat16(), torch.randn(r, 64, requires_grad=True), torch.zeros(96, r, requires_grad=True)
    with ProductDtypes() as products:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kernel == "fused":
                out = FusedLoraLinear.apply(x, weight, None, A, B, 2.0, 0.0, False, torch.bfloat16)
            else:
                h = torch.nn.functional.linear(x, A)
                out = SharedMemberOutput.apply(x, weight, None, h, B, torch.bfloat16)
        out.float().sum().backward()
    base = [dtypes for dtypes, shapes in zip(products.seen, products.shapes) if not any(r in shape for shape in shapes)]
    assert len(base) == 2 and all(s == {torch.bfloat16 if native else torch.float32} for s in base), products.shapes
    assert out.dtype == torch.bfloat16 and x.grad is not None and A.grad is not None
