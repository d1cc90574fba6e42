"""The house rules, read off the code: imports flow one way (DESIGN.md) and no block of code is written twice.

Every import is walked with ast, including imports inside functions (lazy imports are where back-arrows hide), and
``from package import name`` counts as an import of ``package.name`` when that is a module.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("megatron_lc.demo", "megatron_lc.bench", "megatron_lc.generate")  # leaves: only the command table imports them
# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("megatron_lc.model", "megatron_lc.parallel", "the model knows nothing of parallelism"),
    ("megatron_lc.model", "megatron_lc.train", "the model knows nothing of training"),
    ("megatron_lc.ops", "megatron_lc.model", "ops are below the model (dispatch imports ops and kernels only)"),
    ("megatron_lc.parallel", "megatron_lc.train", "parallelize is applied by the trainer, not the reverse"),
    ("megatron_lc.data", "megatron_lc.model", "data knows tokens, not models"),
    ("megatron_lc.data", "megatron_lc.parallel", "data knows tokens, not meshes"),
    ("megatron_lc.data", "megatron_lc.train", "data flows into the trainer, not back"),
]


def module_name(path: Path) -> str:
    """megatron_lc/x/y.py -> megatron_lc.x.y; kernels/z.py -> megatron_lc.kernels.z (how setup.py installs it)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["megatron_lc", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = [*ROOT.joinpath("megatron_lc").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # megatron_lc.x.y.attr -> megatron_lc.x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    modules = set(files)
    return {name: imports_of(name, path, modules) for name, path in files.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def package_of(module: str) -> str:
    """The package a module belongs to for the package-level graph: megatron_lc.<pkg>, or the top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_walker_sees_function_level_and_from_package_imports(tmp_path):
    """The walker itself: an import inside a function and ``from .. import pkg`` are both edges."""
    pkg = tmp_path / "megatron_lc"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from .. import b\n    from ..c import thing\n")
    modules = {"megatron_lc", "megatron_lc.a", "megatron_lc.a.x", "megatron_lc.b", "megatron_lc.c"}
    found = imports_of("megatron_lc.a.x", pkg / "a" / "x.py", modules)
    assert found == {"megatron_lc.b", "megatron_lc.c"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_files():
    cycle = _cycle(import_graph())
    assert cycle is None, "import circle between files: " + " -> ".join(cycle)


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        src = package_of(module)
        packages.setdefault(src, set()).update(package_of(t) for t in targets if package_of(t) != src)
    packages.pop("megatron_lc", None)  # the top-level __init__ holds only the version
    for targets in packages.values():
        targets.discard("megatron_lc")
    cycle = _cycle(packages)
    assert cycle is None, "import circle between packages: " + " -> ".join(cycle)


def test_imports_flow_one_way():
    bad = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if _under(target, "megatron_lc.cli"):
                bad.append(f"{module} -> {target}: nothing imports the command table")
            if _under(module, "megatron_lc.kernels") and not _under(target, "megatron_lc.kernels"):
                bad.append(f"{module} -> {target}: kernels import nothing of ours")
            for app in APPS:
                if _under(target, app) and not _under(module, app) and module != "megatron_lc.cli":
                    bad.append(f"{module} -> {target}: {app} is an app; only megatron_lc.cli imports it")
            for src, dst, why in FORBIDDEN:
                if _under(module, src) and _under(target, dst):
                    bad.append(f"{module} -> {target}: {why}")
    assert not bad, "\n".join(bad)


# Listed exceptions to the duplicate-code check, each with its reason. Empty today.
DUPLICATE_EXCEPTIONS: dict[str, str] = {}


@pytest.mark.skipif(shutil.which("pylint") is None and subprocess.run(
    [sys.executable, "-m", "pylint", "--version"], capture_output=True).returncode != 0,
    reason="pylint is in [dev]; install it to run the duplicate-code check")
def test_no_duplicate_code():
    """pylint R0801 with min-similarity-lines=6 (imports, docstrings and comments ignored) over megatron_lc/ and
    kernels/ finds nothing outside DUPLICATE_EXCEPTIONS.

    About 11 s on 2 cores. If it turns slow (it once took 176 s), an attribute assignment on an object astroid can
    infer into a large library is the usual cause (``hf_config.use_cache = False`` had it build all of
    transformers): find the file with pylint.checkers.symilar.stripped_lines per file."""
    run = subprocess.run(
        [sys.executable, "-m", "pylint", "--disable=all", "--enable=R0801", "--min-similarity-lines=6",
         "--ignore-imports=y", "--ignore-docstrings=y", "--ignore-comments=y", "--score=n", "megatron_lc", "kernels"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    blocks = [b for b in run.stdout.split("R0801: Similar lines in ")[1:]
              if not any(key in b for key in DUPLICATE_EXCEPTIONS)]
    assert not blocks, "repeated code (pylint R0801):\n" + "\n".join(blocks)
