"""Evaluation: needle in a haystack (niah.py), loss by position and domain (loss_by_length.py) and long-context QA
scored by exact match and LongBench's token F1 (qa.py).

``megatron-lc eval niah|loss|qa`` (cli.py) loads a model (HF folder or step_<N>/ checkpoint) and a tokenizer
(``megatron_lc.data.tokenizer``: bytes, a sentencepiece .model or an HF tokenizer.json) and uses only the model's
public forward and ``generate``, so the positions its config carries (RoPE base, scaling) apply unchanged.
"""
