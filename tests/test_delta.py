"""The merge arithmetic (delta.py): the update in each weight layout, merge and unmerge as inverses,
DoRA's rescale against its definition."""

import torch

from lorakit import delta


def test_the_update_in_each_layout():
    torch.manual_seed(0)
    A, B = torch.randn(3, 5), torch.randn(4, 3)
    assert torch.allclose(delta.lora_delta(A, B, 0.5), 0.5 * B @ A)
    assert torch.allclose(delta.lora_delta(A, B, 0.5, transposed=True), 0.5 * (B @ A).T)  # Conv1D, embeddings
    E = torch.randn(3, 1)
    assert torch.allclose(delta.lora_delta(A, B, 2.0, E=E), 2.0 * B @ (A * E))  # AdaLoRA's Λ on A's rows
    A4, B4 = torch.randn(3, 2, 3, 3), torch.randn(6, 3, 1, 1)  # a convolution: r×in×k×k, out×r×1×1
    conv = delta.lora_delta(A4, B4, 1.0, shape=(6, 2, 3, 3))
    assert torch.allclose(conv, torch.einsum("or,rikl->oikl", B4.flatten(1), A4))


def test_merge_then_unmerge_gives_the_weight_back_plain_and_dora():
    torch.manual_seed(1)
    W, update = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(4, 5) * 0.1
    merged = delta.merged_weight(W, update)
    assert merged.dtype == torch.float32 and torch.allclose(merged, W.float() + update)
    assert torch.allclose(delta.unmerged_weight(merged, update), W.float(), atol=1e-6)
    m = torch.rand(4) + 0.5
    norm = delta.feature_norm(W.float() + update, axis=0)
    dora = delta.merged_weight(W, update, m, axis=0, norm=norm)
    assert torch.allclose(dora.norm(dim=1), m, atol=1e-5)  # each output feature has its magnitude
    assert torch.allclose(delta.merged_weight(W, update, m, axis=0), dora)  # a clean weight: its own norm
    assert torch.allclose(delta.unmerged_weight(dora, update, m, axis=0, norm=norm), W.float(), atol=1e-5)
    transposed = delta.merged_weight(W.T, update.T, m, axis=1)  # stored in×out: features on axis 1
    assert torch.allclose(transposed, dora.T, atol=1e-6)
