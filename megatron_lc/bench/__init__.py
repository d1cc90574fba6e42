"""The benchmarks, an app over the library (only megatron_lc.cli imports it): ``megatron-lc bench WHAT``.

- ``kernels.py``: each op's implementations (a registry: one entry per op).
- ``train.py``: one training step, ours vs HF transformers (+ Liger-Kernel); one case per process
  (``train_worker.py``), the table and plot in ``train_report.py``.
- ``cp.py``: context-parallel attention per rank vs CP degree.
- ``data.py``: tokenize+pack throughput vs the tokenizer's own batch encode.

Peak memory is measured by megatron_lc.memory, as the trainer measures it.
"""
