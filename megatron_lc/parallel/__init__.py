"""Parallelism applied after the model is built: DeviceMesh, context parallelism, FSDP2, TP (later issues)."""
