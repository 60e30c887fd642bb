"""The mixed-adapter LoRA kernel against torch: fp32 and bf16, ranks and widths off its 16-lane
blocks, rows on the base, strided rows, two threads at once, and what it refuses."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lorakit.errors import LoraError
from lorakit.kernels.mixed_lora import load, torch_reference as reference
from tests.helpers import needs_compiler

pytestmark = needs_compiler


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built, how = load(str(tmp_path_factory.mktemp("kernels")))
    assert built is not None, how
    return built


def stacks(slots, rank, in_dim, out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, rank, in_dim, generator=gen).to(dtype)
    B = (torch.randn(slots, rank, out, generator=gen) * 0.1).to(dtype)
    return A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank,in_dim,out", [(8, 576, 192), (1, 17, 5), (16, 64, 1536), (3, 100, 33)])
def test_each_row_gets_its_own_adapter(kernel, dtype, rank, in_dim, out):
    A, B = stacks(5, rank, in_dim, out, dtype)
    x = torch.randn(7, in_dim).to(dtype)
    result = torch.randn(7, out).to(dtype)
    slots = torch.tensor([4, -1, 0, 2, 2, -1, 1])
    expected = reference(result, x, A, B, slots)
    got = kernel.add(result.clone(), x, A, B, slots)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:  # one bf16 rounding of the sum apart at most
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(got[1], result[1]) and torch.equal(got[5], result[5])  # base rows untouched


def test_rows_of_strided_views_are_read_and_written_in_place(kernel):
    A, B = stacks(3, 4, 40, 24, torch.float32)
    x_wide, out_wide = torch.randn(4, 60), torch.randn(4, 30)
    x, result = x_wide[:, :40], out_wide[:, 2:26]  # row strides 60 and 30
    before = out_wide.clone()
    slots = torch.tensor([1, 2, -1, 1])
    expected = reference(result.clone(), x, A, B, slots)
    kernel.add(result, x, A, B, slots)
    torch.testing.assert_close(out_wide[:, 2:26], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_wide[:, :2], before[:, :2]) and torch.equal(out_wide[:, 26:], before[:, 26:])


def test_two_threads_at_once_get_their_own_results(kernel):
    A, B = stacks(4, 8, 128, 96, torch.float32)

    def job(seed):
        gen = torch.Generator().manual_seed(seed)
        x, result = torch.randn(33, 128, generator=gen), torch.randn(33, 96, generator=gen)
        slots = torch.randint(-1, 4, (33,), generator=gen)
        return kernel.add(result.clone(), x, A, B, slots), reference(result, x, A, B, slots)
    with ThreadPoolExecutor(2) as pool:
        for got, expected in pool.map(job, range(8)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_what_it_does_not_take(kernel):
    A, B = stacks(2, 4, 16, 8, torch.float32)
    x, result = torch.randn(3, 16), torch.randn(3, 8)
    assert kernel.supports(result, x, A)
    assert not kernel.supports(result.half(), x.half(), A.half())  # fp16: torch's GEMMs
    assert not kernel.supports(result, x.double(), A)
    assert not kernel.supports(result, x.t().contiguous().t(), A)  # columns not contiguous
    wide = torch.randn(2, kernel.max_rank + 1, 16)
    assert not kernel.supports(result, x, wide)
    with pytest.raises(LoraError, match="shapes do not fit"):
        kernel.add(result, torch.randn(3, 15), A, B, torch.tensor([0, 1, -1]))
    with pytest.raises(LoraError, match="shapes do not fit"):
        kernel.add(result, x, A, B, torch.tensor([0, 1]))
