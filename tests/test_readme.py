"""Issue 17: the README runs as written.

Every fenced ``bash`` / ``python`` block of README.md carries a mark in an HTML comment on the line before its
fence: ``<!-- setup -->`` (the two install commands, which CI runs itself), ``<!-- gpu -->`` (needs CUDA) or
``<!-- test -->`` (runs here). Any other fence names a language that is not a shell or Python (``text``), so no
command can hide in an unmarked block. The slow walkthrough test runs every ``test`` block in order in a fresh
folder that holds only a copy of ``configs/``, as a user's clone would, and fails on the first block that exits
non-zero, printing that block and its output.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKS = ("setup", "gpu", "test")
CODE_LANGUAGES = ("bash", "python")  # what the walkthrough knows how to run
PLAIN_LANGUAGES = ("text", "yaml", "json")
MARK_RE = re.compile(r"^<!--\s*(\S+)\s*-->\s*$")
BLOCK_TIMEOUT_S = 600  # one block far over the budget is a hang: stop it and report it rather than wait forever


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str  # the word after the opening fence ('' when none)
    mark: str | None  # the word of the HTML comment on the line before the fence, if any
    code: str


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order, with the mark of the comment line before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("```"):  # an indented fence (in a list item) counts too
            i += 1
            continue
        start = i
        language = lines[i].lstrip()[3:].strip()
        previous = lines[i - 1].strip() if i else ""
        m = MARK_RE.match(previous)
        i += 1
        body = []
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: the code fence opened here is never closed")
        blocks.append(Block(start + 1, language, m.group(1) if m else None, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _blocks() -> list[Block]:
    return readme_blocks(README.read_text(encoding="utf-8"))


def test_every_readme_code_block_is_marked():
    """A bash or python block without a mark (or with an unknown one) would be neither run nor knowingly skipped;
    a fence without a language could hold a command that escapes the rule."""
    problems = []
    for b in _blocks():
        where = f"README.md:{b.line}"
        if b.language in CODE_LANGUAGES:
            if b.mark not in MARKS:
                problems.append(f"{where}: ```{b.language} block has mark {b.mark!r}; put one of "
                                + ", ".join(f"<!-- {m} -->" for m in MARKS) + " on the line before the fence")
        elif b.language in PLAIN_LANGUAGES:
            if b.mark is not None:
                problems.append(f"{where}: a ```{b.language} block is not run; drop its <!-- {b.mark} --> mark")
        else:
            problems.append(f"{where}: fence language {b.language!r}; name one of "
                            f"{', '.join(CODE_LANGUAGES + PLAIN_LANGUAGES)} (```text for a listing)")
    assert not problems, "\n".join(problems)
    marks = [b.mark for b in _blocks() if b.language in CODE_LANGUAGES]
    assert marks.count("setup") == 2, f"README.md has {marks.count('setup')} setup blocks; the two install " \
                                      f"commands (demo, tests) are the setup blocks"
    assert "test" in marks, "README.md has no block marked <!-- test -->: the walkthrough would run nothing"


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run says it installs and tests as README says: its commands, less pip's -q, are the README's."""
    setup = [b.code.strip() for b in _blocks() if b.mark == "setup"]
    assert len(setup) == 2, f"README.md has {len(setup)} setup blocks, not the two install commands (demo, tests)"
    demo, tests = setup
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_install = re.search(r"^pip install -q torch.*$", ci, re.M)
    assert ci_install, ".ci/run has no `pip install -q torch ...` line"
    install = ci_install.group(0).replace(" -q", "")
    assert f"&& {install} &&" in tests, f"README's test command does not install as .ci/run does ({install!r}):\n" \
                                        f"{tests}"
    torch_install = install.split(" && ")[0]
    assert f"&& {torch_install} &&" in demo, f"README's demo command installs torch otherwise than {torch_install!r}"
    ci_pytest = re.search(r"^pytest_ok (-q -n \d+)", ci, re.M)
    assert ci_pytest, ".ci/run has no `pytest_ok -q -n N` line (README's test command)"
    assert tests.endswith(f"python -m pytest {ci_pytest.group(1)}"), \
        f"README's test command does not end with .ci/run's `python -m pytest {ci_pytest.group(1)}`:\n{tests}"


def test_readme_names_the_cpu_wheel_index_for_a_stock_machine():
    """Issue 17 point 12: on a stock Linux machine PyPI's torch is a CUDA build; the README says how to get the CPU
    build, beside the command that works on the CI machine."""
    text = README.read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install torch==2.13.0 -c constraints.txt" in text


def _run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one block in ``cwd``: python blocks with this Python, bash blocks with ``bash``; output merged."""
    if block.language == "python":
        cmd, stdin = [sys.executable, "-"], block.code
    else:  # a shell block stops at its first failing command, as a user reading its output would
        cmd, stdin = ["bash", "-c", "set -eo pipefail\n" + block.code], None
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """Every <!-- test --> block, in order, in a fresh folder beside a copy of configs/ (a clone as the README
    assumes), with this Python's megatron-lc, torchrun and python first on PATH."""
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for in-process kernel tests; a user's shell has none
    blocks = [b for b in _blocks() if b.mark == "test"]
    assert blocks, "README.md has no <!-- test --> block"
    times = []
    for b in blocks:
        start = time.perf_counter()
        try:
            done = _run_block(b, work, env)
        except subprocess.TimeoutExpired as e:
            out = e.output if isinstance(e.output, str) else (e.output or b"").decode(errors="replace")
            pytest.fail(f"README.md:{b.line} block ran past {BLOCK_TIMEOUT_S} s:\n{b.code}\n--- output ---\n"
                        f"{out[-6000:]}", pytrace=False)
        times.append(f"{b.line}: {time.perf_counter() - start:.1f}")
        if done.returncode != 0:
            pytest.fail(f"README.md:{b.line} block exited with status {done.returncode} (run in {work}):\n{b.code}"
                        f"\n--- output (last 6000 characters) ---\n{done.stdout[-6000:]}\n"
                        f"--- seconds per block (README line: s) ---\n{', '.join(times)}", pytrace=False)
    print("README blocks (line: seconds): " + ", ".join(times))
