"""The trainer: run config, token-file data source, optimizer and schedules, DCP checkpoints, metrics, the loop, and
the ``train`` / ``convert`` commands. Run by ``megatron-lc train`` (one process or every process of torchrun)."""
