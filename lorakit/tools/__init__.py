"""Standalone utilities over adapters and models: memory estimate, analysis, extraction,
combining saved adapters, plots."""
