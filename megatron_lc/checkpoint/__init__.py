"""Checkpoints and model folders: our DCP ``step_<N>/`` folders with their completion marker (folders.py), HF
folders <-> checkpoints and loading either kind as a model (convert.py), and the ``convert`` command (cli.py)."""
