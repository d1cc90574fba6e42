"""Text that ships with Python: the standard library's docstrings (prose) and its source files (code).

Nothing is downloaded, and the same Python gives the same text, so the demo trains on it, the NIAH haystack and
the loss-by-length domains default to it, and the data benchmark builds its corpus from it.
"""
from __future__ import annotations

import ast
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
"""Folders left out by default: test suites and IDLE are not the library's own text; installed packages vary."""
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> str:
    """The folder of this Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(skip_dirs: frozenset[str] = SKIP_DIRS) -> list[str]:
    """Paths of the standard library's .py files outside folders named in ``skip_dirs``, in sorted order."""
    root = stdlib_root()
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    # Sort by the path relative to the root with "/" separators, so the order does not depend on the OS walk.
    return sorted(paths, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def stdlib_sources(skip_dirs: frozenset[str] = SKIP_DIRS) -> Iterator[str]:
    """The text of each of ``stdlib_files(skip_dirs)`` read as UTF-8, in that order; unreadable files are skipped."""
    for path in stdlib_files(skip_dirs):
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except (OSError, UnicodeDecodeError):
            continue


def stdlib_docstrings(max_bytes: int = 8 * 2**20) -> list[str]:
    """Module/class/function docstrings of the standard library, as a list of documents (str).

    Files are read in sorted order and documents taken until their UTF-8 size would pass ``max_bytes``, so the
    same Python gives the same list. Exact duplicates are dropped (boilerplate such as the codec modules' would
    otherwise appear in both the train and the validation split). Files that fail to read or parse are skipped.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in stdlib_files():
        try:
            with tokenize.open(path) as f:  # honours a file's coding cookie
                source = f.read()
            with warnings.catch_warnings():  # e.g. SyntaxWarning for invalid escapes in old modules
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOC_NODES):
                continue
            doc = ast.get_docstring(node)
            if not doc or doc in seen:
                continue
            size = len(doc.encode("utf-8"))
            if total + size > max_bytes:
                return docs
            seen.add(doc)
            docs.append(doc)
            total += size
    if not docs:
        raise RuntimeError(f"no docstrings found under {stdlib_root()}: this Python ships no .py sources for its "
                           f"standard library, so there is no stdlib text to use")
    return docs


def stdlib_docstring_text(max_bytes: int = 4 * 2**20) -> str:
    """``stdlib_docstrings(max_bytes)`` joined by blank lines: prose (the default NIAH haystack)."""
    return "\n\n".join(stdlib_docstrings(max_bytes))


def stdlib_code_text(max_chars: int = 4 * 2**20) -> str:
    """Source code of the standard library (``stdlib_sources`` joined by newlines) cut at ``max_chars``
    characters: the default 'code' domain beside the docstring prose."""
    parts, total = [], 0
    for text in stdlib_sources():
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]
