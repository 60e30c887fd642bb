"""Files: PEFT's adapter format (one home for its key names), crash-safe writes, run records,
GGUF export, and merging on checkpoint files."""
