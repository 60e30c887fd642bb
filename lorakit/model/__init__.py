"""Operations on a whole model: targeting, injection, adapter state, merging, combining, mixed
batches, quantizing, parameter reports, LoRA+ and AdaLoRA's rank allocation."""
