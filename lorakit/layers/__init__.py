"""The LoRA wrappers: one abstraction (base.LoraLayer) and a module per wrapped layer type."""
