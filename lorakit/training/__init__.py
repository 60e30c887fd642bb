"""Training: options, data, the loop, DDP / FSDP placement, evaluation, sweeps (`lorakit train`)."""
