"""The trainer: run config, token-file data source, optimizer and schedules, metrics, the loop, and the ``train``
command (cli.py; checkpoints: megatron_lc.checkpoint). Run by ``megatron-lc train`` (one process or every process of
torchrun)."""
