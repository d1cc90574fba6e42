"""Data pipeline: documents in (JSONL/Parquet), tokenizers, cleaning, dedup, mixtures, Megatron .bin/.idx token files,
packed samples and blends, the resumable loader, and the ``megatron-lc data`` stages (docs/data.md)."""
