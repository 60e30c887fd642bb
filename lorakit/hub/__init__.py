"""Where base models and shipped datasets come from: names, paths, loading with a head."""
