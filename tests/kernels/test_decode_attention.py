"""The decoding-step attention kernel against torch's SDPA over the padded mask: every shape the
tuned loops cover and the plain loop for the rest, rows of different lengths in a slot-cache-like
strided buffer, built once into a cache folder, and a clear refusal without a compiler."""


import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import LoraError
from lorakit.kernels import decode_attention, native
from lorakit.kernels.decode_attention import DecodeAttention, library_name, load
from tests.helpers import needs_compiler

pytestmark = needs_compiler


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built, how = load(str(tmp_path_factory.mktemp("kernels")))
    assert built is not None, how
    return built


def sdpa_reference(query, key, value, lengths, scale):
    """SDPA over the widest row's columns, each row's columns past its length masked out."""
    columns = torch.arange(key.shape[2])
    mask = torch.zeros(len(lengths), 1, 1, key.shape[2])
    mask.masked_fill_((columns >= lengths.view(-1, 1)).view(len(lengths), 1, 1, -1), torch.finfo(torch.float32).min)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


# (query heads, key/value heads, head size): SmolLM2, LLaMA-2, Llama-3, a Phi-like 80, Gemma's 256,
# no grouping; 8 and 12 (tiny test models, and 12 groups) go through the plain loop
SHAPES = [(9, 3, 64), (32, 32, 128), (32, 8, 128), (32, 32, 80), (8, 1, 256), (6, 3, 96), (4, 2, 8), (12, 1, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES, ids=lambda v: str(v))
def test_each_row_attends_to_its_own_columns_as_sdpa_with_the_padded_mask(kernel, heads, kv_heads, dim, dtype):
    torch.manual_seed(heads + dim)
    rows, capacity = 7, 96
    # a slot cache's layer: slots x kv_heads x capacity x dim, read as a view of the first rows and columns
    keys, values = (torch.randn(rows + 2, kv_heads, capacity, dim).to(dtype) for _ in range(2))
    lengths = torch.tensor([1, 5, 40, 73, 2, 73, 33])
    width = int(lengths.max())
    query = torch.randn(rows, 1, heads, dim).to(dtype).transpose(1, 2)  # strided, as transformers hands it over
    key, value = keys[:rows, :, :width], values[:rows, :, :width]
    assert kernel.supports(query, key, value)
    got = kernel.attend(query, key, value, lengths, width, dim ** -0.5)
    assert got.dtype == dtype
    # bf16: the same inputs in fp32 through SDPA, within the rounding of the bf16 result
    expected = sdpa_reference(query.float(), key.float(), value.float(), lengths, dim ** -0.5)
    tolerance = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2 ** -8)
    torch.testing.assert_close(got.float(), expected, **tolerance)
    assert kernel.tuned(heads // kv_heads, dim) == (heads // kv_heads <= 8 and dim in (64, 80, 96, 128, 256))


def test_columns_past_a_rows_length_are_never_read(kernel):
    torch.manual_seed(0)
    key, value = torch.randn(2, 3, 20, 64), torch.randn(2, 3, 20, 64)
    query, lengths = torch.randn(2, 9, 1, 64), torch.tensor([6, 20])
    before = kernel.attend(query, key, value, lengths, 20, 0.125)
    key[0, :, 6:], value[0, :, 6:] = float("nan"), float("nan")  # row 0's padding
    torch.testing.assert_close(kernel.attend(query, key, value, lengths, 20, 0.125), before)


def test_what_it_does_not_take():
    query, key = torch.randn(2, 9, 1, 64), torch.randn(2, 3, 8, 64)
    assert DecodeAttention.supports(query.bfloat16(), key.bfloat16(), key.bfloat16())
    assert not DecodeAttention.supports(query.half(), key.half(), key.half())
    assert not DecodeAttention.supports(query, key.bfloat16(), key.bfloat16())  # one dtype for all
    assert not DecodeAttention.supports(torch.randn(2, 9, 3, 64), key, key)  # three query tokens
    assert not DecodeAttention.supports(torch.randn(2, 8, 1, 64), key, key)  # 8 heads over 3
    assert not DecodeAttention.supports(query, key.transpose(2, 3).contiguous().transpose(2, 3), key)


def test_lengths_beyond_the_columns_are_refused_before_the_kernel_reads(kernel):
    query, key = torch.randn(2, 9, 1, 64), torch.randn(2, 3, 8, 64)
    with pytest.raises(LoraError, match="at most 8 columns"):
        kernel.attend(query, key, key, torch.tensor([3, 9]), 9, 0.125)
    with pytest.raises(LoraError, match="int64"):
        kernel.attend(query, key, key, torch.tensor([3, 8], dtype=torch.int32), 8, 0.125)


def test_it_is_built_once_into_its_folder_under_a_name_of_its_source_and_cpu(tmp_path):
    load.cache_clear()
    built, how = load(str(tmp_path))
    assert built is not None and built.path == tmp_path / library_name() and str(tmp_path) in how
    assert [p.name for p in tmp_path.iterdir()] == [library_name()]  # the scratch folder is gone
    stamp = built.path.stat().st_mtime_ns
    load.cache_clear()
    again, _ = load(str(tmp_path))
    assert again is not None and again.path.stat().st_mtime_ns == stamp  # not rebuilt


def test_without_a_compiler_it_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    load.cache_clear()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    built, how = load(str(tmp_path / "named"))
    assert built is None and "did not run" in how and "no-such-compiler" in how
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    built, how = load(str(tmp_path / "none"))
    assert built is None and how.startswith("no C++ compiler found")
    assert not list(tmp_path.rglob("*.so"))
    load.cache_clear()


def test_a_failed_build_says_why_and_leaves_no_library(tmp_path, monkeypatch):
    load.cache_clear()
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(decode_attention, "SOURCE", broken)
    built, how = load(str(tmp_path / "kernels"))
    assert built is None and how.startswith("its build failed")
    assert not any((tmp_path / "kernels").glob("*.so"))
    load.cache_clear()


def test_two_threads_at_once_get_their_own_results(kernel):
    """The server's two workers call it at the same time (ctypes lets go of the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    jobs = []
    for rows in (5, 9):
        key, value = torch.randn(rows, 3, 300, 64), torch.randn(rows, 3, 300, 64)
        jobs.append((torch.randn(rows, 9, 1, 64), key, value, torch.randint(1, 301, (rows,))))
    alone = [kernel.attend(q, k, v, n, int(n.max()), 0.125) for q, k, v, n in jobs]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(20):
            together = list(pool.map(lambda job: kernel.attend(job[0], job[1], job[2], job[3], int(job[3].max()), 0.125),
                                     jobs))
            for got, expected in zip(together, alone):
                assert torch.equal(got, expected)
