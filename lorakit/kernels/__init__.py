"""Compute primitives with no notion of a model: the fused LoRA / DoRA autograd paths, chunked
cross-entropy, NF4 4-bit storage."""
