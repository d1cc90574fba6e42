"""megatron_lc.data.stdlib_text: the standard library's docstrings and source as deterministic, capped text."""
import os

from megatron_lc.data.stdlib_text import (
    SKIP_DIRS,
    stdlib_code_text,
    stdlib_docstring_text,
    stdlib_docstrings,
    stdlib_files,
    stdlib_root,
)


def test_stdlib_docstrings_are_nonempty_deterministic_and_capped():
    docs = stdlib_docstrings(200_000)
    assert len(docs) > 50
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(len(d.encode("utf-8")) for d in docs) <= 200_000
    assert len(set(docs)) == len(docs)
    assert stdlib_docstrings(200_000) == docs
    assert stdlib_docstrings(100_000) == docs[:len(stdlib_docstrings(100_000))]  # a smaller cap takes a prefix
    assert stdlib_docstring_text(200_000) == "\n\n".join(docs)


def test_stdlib_files_skip_tests_in_a_stable_order_and_code_text_is_capped():
    root = stdlib_root()
    files = stdlib_files()
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")[:-1]) & SKIP_DIRS for r in rel)
    assert len(stdlib_files(frozenset())) > len(files)  # the test suites are there when not skipped
    code = stdlib_code_text(50_000)
    assert len(code) == 50_000 and "def " in code
    assert stdlib_code_text(20_000) == code[:20_000]
