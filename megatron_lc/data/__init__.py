"""Data pipeline: tokenizers, cleaning, dedup, mixtures, packing and loaders (later issues)."""
