"""The task-vector algebra on small tensors worked by hand, and DARE's drop checked statistically."""

import pytest
import torch

import lorakit as lk
from lorakit.model.task_arithmetic import combine_tensors, majority_sign_mask, prune_by_magnitude, prune_randomly


def test_magnitude_pruning_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert torch.equal(prune_by_magnitude(t, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert torch.equal(prune_by_magnitude(t, 1.0), t)


def test_dare_keeps_density_and_rescales():
    torch.manual_seed(0)
    t = torch.randn(400, 500)
    for density in (0.1, 0.5, 0.9):
        pruned = prune_randomly(t, density)
        kept = pruned != 0
        assert abs(kept.float().mean().item() - density) < 0.01  # 200k draws: sd ≈ 0.001
        assert torch.allclose(pruned[kept], t[kept] / density)  # survivors rescaled by 1/density
        assert abs(pruned.sum().item() - t.sum().item()) < 0.05 * t.abs().sum().item()  # expectation kept


def test_ties_elects_a_sign_and_averages_agreeing_entries():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-1.5, -1.0, 1.0, 0.5])
    weights = torch.tensor([1.0, 1.0])
    # density 1 keeps everything; sign by total: [-0.5 -> -, -3 -> -, 4 -> +, 1 -> +]
    out = combine_tensors("ties", [a, b], weights, density=1.0)
    assert torch.allclose(out, torch.tensor([-1.5, -1.5, 2.0, 0.5]))
    # by frequency: entry 0 is a 1-1 tie, which goes to +
    mask = majority_sign_mask(torch.stack([a, b]), "frequency")
    assert mask[:, 0].tolist() == [True, False]


def test_linear_and_magnitude_prune_are_weighted_sums():
    a, b = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 3.0])
    w = torch.tensor([0.5, 2.0])
    assert torch.allclose(combine_tensors("linear", [a, b], w), torch.tensor([4.0, 6.5]))
    assert torch.allclose(combine_tensors("magnitude_prune", [a, b], w, density=0.5), torch.tensor([2.0, 6.0]))


@pytest.mark.parametrize("density", [None, 0.0, 1.01])
def test_bad_density(density):
    with pytest.raises(lk.ConfigError, match="density"):
        combine_tensors("dare_ties", [torch.ones(2)], torch.ones(1), density=density)
