"""Parallelism applied after the model is built: ParallelDims (sizes and meshes), parallelize (TP, context
parallelism, activation checkpointing, compile, FSDP2), and the context-parallel attention it swaps in."""
