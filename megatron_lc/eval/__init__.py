"""Evaluation: needle-in-a-haystack, loss by position and domain (later issues)."""
