import json
import subprocess
import sys

import peft
import pytest
import torch

import lorakit as lk
from lorakit.tools import analysis
from tests.helpers import logits, randomize_lora, tiny_bert, tiny_llama


def saved(tmp_path, name, r, seed=0, targets=("q_proj", "v_proj", "embed_tokens")):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    randomize_lora(model, scale=0.3, seed=seed)
    return lk.save_adapter(model, tmp_path / name), model


def test_singular_values_match_a_dense_svd(tmp_path):
    path, model = saved(tmp_path, "a", 4)
    _, updates, _ = analysis.load_updates(path)
    for update in updates:
        layer = model.get_submodule(update.path)
        dense = torch.linalg.svdvals(layer.delta_weight("default").double())[: update.rank]
        assert torch.allclose(update.factors()[1], dense, rtol=1e-6, atol=1e-9)


def test_effective_rank_and_recommendation():
    assert analysis.energy_rank(torch.tensor([3.0, 4.0, 0.0]), 0.9) == 2
    assert analysis.energy_rank(torch.tensor([10.0, 1.0, 0.1]), 0.9) == 1
    assert analysis.energy_rank(torch.tensor([10.0, 1.0, 0.1]), 0.999) == 2


def test_phi_is_one_for_the_same_subspace_and_bounded():
    A = torch.randn(8, 64)
    grid = analysis.subspace_similarity(A, torch.randn(8, 8) @ A)  # same row space
    assert grid.shape == (8, 8) and torch.allclose(grid[-1, -1], torch.tensor(1.0, dtype=grid.dtype))
    other = analysis.subspace_similarity(torch.randn(4, 64), torch.randn(16, 64))
    assert other.shape == (4, 16) and float(other.min()) >= 0 and float(other.max()) <= 1 + 1e-9
    # brute force one entry against the formula
    A1, A2 = torch.randn(4, 32).double(), torch.randn(6, 32).double()
    U1 = torch.linalg.svd(A1, full_matrices=False)[2].T
    U2 = torch.linalg.svd(A2, full_matrices=False)[2].T
    want = torch.linalg.matrix_norm(U1[:, :2].T @ U2[:, :3]) ** 2 / 2
    assert torch.isclose(analysis.subspace_similarity(A1, A2)[1, 2], want)


def test_compress_is_exact_at_full_rank_and_loads_in_peft(tmp_path, ids):
    path, model = saved(tmp_path, "a", 8)
    expected = logits(model, ids)
    result = analysis.compress(path, tmp_path / "same", rank=8)
    assert result["max_relative_error"] < 1e-6
    small = analysis.compress(path, tmp_path / "small", rank=2)
    assert small["new_rank"] == 2 and 0 < small["max_relative_error"] < 1
    reloaded = lk.load_adapter(tiny_llama(), tmp_path / "same")
    assert torch.allclose(logits(reloaded, ids), expected, atol=1e-4)
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "small").eval()
    ours = lk.load_adapter(tiny_llama(), tmp_path / "small")
    assert torch.allclose(logits(in_peft, ids), logits(ours, ids), atol=1e-5)


def test_compress_by_energy_writes_per_module_ranks_peft_reads(tmp_path, ids):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # q_proj: rank-1 update; v_proj: full rank-8
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape))
            if "q_proj.lora_A" in name:
                p.copy_(torch.randn(1, p.shape[1]).repeat(p.shape[0], 1))
    path = lk.save_adapter(model, tmp_path / "a")
    result = analysis.compress(path, tmp_path / "e", energy=0.999)
    ranks = {row["module"].split(".")[-1]: row["new_rank"] for row in result["modules"]}
    assert ranks == {"q_proj": 1, "v_proj": 8}
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["r"] == 8 and len(config["rank_pattern"]) == 2  # the two q_proj layers
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "e").eval()
    assert torch.allclose(logits(in_peft, ids), logits(model, ids), atol=1e-3)


def test_bad_inputs(tmp_path):
    path, _ = saved(tmp_path, "a", 4)
    with pytest.raises(lk.ConfigError, match="rank 16 is not below the adapter's rank 4; choose 1..4"):
        analysis.compress(path, tmp_path / "x", rank=16)
    with pytest.raises(lk.ConfigError, match="exactly one of"):
        analysis.compress(path, tmp_path / "x")
    bert = lk.save_adapter(lk.inject(tiny_bert(), lk.LoraConfig(target_modules=["query"])), tmp_path / "bert")
    with pytest.raises(lk.AdapterMismatchError, match="no module in common"):
        analysis.compare(path, bert)


def test_compare_refuses_different_base_models(tmp_path):
    first, _ = saved(tmp_path, "a", 4)
    other = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="other/model"))
    second = lk.save_adapter(other, tmp_path / "b")
    config = json.loads((first / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/model"
    (first / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lk.AdapterMismatchError, match="different base models: 'some/model' vs 'other/model'"):
        analysis.compare(first, second)


@pytest.mark.slow
def test_cli_analyze_compare_and_plots(tmp_path):
    first, _ = saved(tmp_path, "a", 4, seed=1)
    second, _ = saved(tmp_path, "b", 8, seed=2)
    out = subprocess.run([sys.executable, "-m", "lorakit", "analyze", str(first), "--plot", str(tmp_path / "p"),
                          "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert len(report["modules"]) == 5 and "recommendation" in report
    assert all((tmp_path / "p" / f).stat().st_size > 1000 for f in ("energy_by_rank.png", "effective_rank.png"))
    out = subprocess.run([sys.executable, "-m", "lorakit", "analyze", str(first), "--compare", str(second),
                          "--plot", str(tmp_path / "c")], capture_output=True, text=True, check=True)
    assert "phi(1,1)" in out.stdout
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "similarity_embed_tokens.png", "similarity_q_proj.png", "similarity_v_proj.png"]
    bad = subprocess.run([sys.executable, "-m", "lorakit", "compress", str(first), "--rank", "9", "--output",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "rank 9 is not below the adapter's rank 4" in bad.stderr
