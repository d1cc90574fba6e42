"""The torchrun trainer: config, mesh, optimizer, checkpoints, metrics (later issues)."""
