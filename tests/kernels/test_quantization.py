import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import AdapterFileError, ConfigError, MergeStateError
from lorakit.kernels.nf4 import BLOCK, NF4_CODE, Linear4bit, dequantize_constants, quantize_constants, unpack
from tests.helpers import logits, randomize_lora, tiny_llama

SPEC_CODE = [-1.0, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0.0, 0.07958, 0.16093, 0.24611,
             0.33792, 0.44071, 0.56262, 0.72296, 1.0]


def test_code_book_is_the_specs():
    assert torch.allclose(NF4_CODE, torch.tensor(SPEC_CODE), atol=6e-6)


def quantized(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return Linear4bit.from_linear(linear)


@pytest.mark.parametrize("shape", [(96, 64), (7, 9), (130, 33)])  # the last two need padding
def test_codes_are_the_nearest_level_of_each_block_scaled_by_its_absmax(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    layer = quantized(weight)
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, (-weight.numel()) % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(1)
    codes = unpack(layer.packed).view(-1, BLOCK).long()
    brute = (flat.unsqueeze(-1) / absmax.view(-1, 1, 1) - NF4_CODE).abs().argmin(-1)
    assert torch.equal(codes, brute)
    # packing: the first value of each pair sits in the high nibble
    assert int(layer.packed[0]) == (int(brute.view(-1)[0]) << 4) | int(brute.view(-1)[1])
    constants = dequantize_constants(layer.absmax_q, layer.absmax_scale, layer.absmax_offset)
    assert torch.allclose(constants, absmax, rtol=0, atol=float(absmax.max()) / 127)
    restored = layer.dequantized_weight()
    assert restored.shape == weight.shape
    # the error is at most half the widest gap between levels, times the block's absmax (plus the 8-bit constants)
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2
    bound = (half_gap * constants + (constants - absmax).abs()).repeat_interleave(BLOCK)[: weight.numel()]
    assert ((restored - weight).abs().reshape(-1) <= bound + 1e-7).all()


def test_storage_is_4_127_bits_per_weight():
    layer = Linear4bit(4096, 4096, bias=False)
    assert abs(layer.storage_bits() - 4.127) < 0.001
    assert Linear4bit(576, 1536).storage_bits() <= 4.2


def test_double_quantization_of_the_constants():
    torch.manual_seed(1)
    absmax = torch.rand(1000) * 0.1 + 0.01
    q, scale, offset = quantize_constants(absmax)
    assert q.dtype == torch.int8 and scale.numel() == 4
    assert (dequantize_constants(q, scale, offset) - absmax).abs().max() <= scale.max() / 2 + 1e-7


def test_matches_bitsandbytes_codes_and_values():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    weight = torch.randn(256, 192) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantized(weight)
    assert torch.equal(packed.view(-1), ours.packed)
    theirs = bnb_functional.dequantize_4bit(packed, state)
    # same codes; the double-quantized constants differ slightly (bitsandbytes uses a dynamic 8-bit map)
    assert (theirs - ours.dequantized_weight()).abs().max() < 0.01 * weight.abs().max()


def test_quantize_model_keeps_head_and_embeddings_and_stays_close(ids):
    model = tiny_llama()
    reference = logits(model, ids)
    lk.quantize(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit" and kinds["lm_head"] == "Linear"
    assert kinds["model.embed_tokens"] == "Embedding"
    out = logits(model, ids)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    q = model.model.layers[0].mlp.gate_proj
    assert q.packed.numel() + q.absmax_q.numel() < q.in_features * q.out_features * 4 / 7  # ≈ 1/8 of fp32
    with pytest.raises(ConfigError, match="before injecting"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
        lk.quantize(model)


def test_qlora_trains_only_adapters_and_merges_into_a_dequantized_copy(ids):
    model = lk.quantize(tiny_llama())
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    packed_before = model.model.layers[0].self_attn.q_proj.base_layer.packed.clone()
    report = lk.trainable_parameters(model)
    assert report.total > report.trainable > 0
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.packed, packed_before)

    randomize_lora(model, scale=0.3)
    model.eval()
    adapted = logits(model, ids)
    with pytest.raises(MergeStateError, match="lk.dequantize"):
        lk.merge(model)
    copy = __import__("copy").deepcopy(model)
    plain = lk.unload(model, merge=True)  # dequantizes, then merges in fp32
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), adapted, atol=1e-4)
    with pytest.warns(UserWarning, match="requantizes"):
        lk.merge(copy, requantize=True)  # allowed, lossy: the update is rounded to NF4 levels
    requantized = logits(copy, ids)
    assert torch.isfinite(requantized).all() and not torch.allclose(requantized, adapted, atol=1e-4)


def test_qlora_adapter_is_an_ordinary_peft_adapter(ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = lk.quantize(tiny_llama())
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "a")
    expected = logits(model, ids)
    base = lk.dequantize(lk.quantize(tiny_llama()))  # the same 4-bit weights, as plain fp32 Linear
    in_peft = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    assert torch.allclose(logits(in_peft, ids), expected, atol=1e-5)


def test_save_and_load_quantized_and_mismatch_errors(ids, tmp_path):
    model = lk.quantize(tiny_llama())
    lk.save_quantized(model, tmp_path / "q")
    fresh = lk.load_quantized(tiny_llama(seed=5), tmp_path / "q")
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    other = tiny_llama(layers=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFileError, match="does not match this model"):
        lk.load_quantized(other, tmp_path / "q")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_nf4.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterFileError, match="not a readable lorakit 4-bit checkpoint"):
        lk.load_quantized(tiny_llama(), tmp_path / "bad")


def test_bf16_compute_and_autocast(ids):
    model = lk.quantize(tiny_llama(), compute_dtype=torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None
