"""``megatron-lc --help``, each light subcommand's ``--help`` and usage errors answer without importing torch (it
costs 2-7 s of imports; issue 17 point 11): the command table imports a subcommand's module only when it is used."""
import subprocess
import sys
import time

import pytest

_PROBE = """
import contextlib, io, json, sys
from megatron_lc.cli import main
argv = json.loads(sys.argv[1])
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
heavy = sorted(m for m in ("torch", "numpy", "transformers", "triton") if m in sys.modules)
print(json.dumps({"status": status, "heavy": heavy, "out": out.getvalue()}))
"""

LIGHT = [["--help"], [], ["nosuch"], ["convert", "--help"], ["convert", "--from", "x"],
         ["eval", "--help"], ["eval", "niah", "--help"], ["eval", "loss", "--help"], ["eval", "qa", "--help"],
         ["generate", "--help"],
         ["chat", "--help"], ["train", "--help"], ["train", "--config"], ["data", "--help"], ["data", "mix", "--help"],
         ["data", "tokenize"], ["data", "sft", "--help"], ["data", "synth-qa", "--help"]]


@pytest.mark.parametrize("argv", LIGHT, ids=[" ".join(a) or "no-args" for a in LIGHT])
def test_help_and_usage_errors_import_no_torch(argv):
    import json

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          check=True, timeout=60)
    seconds = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], (argv, result["heavy"])
    assert result["status"] in (0, 2), result  # help: 0; no command, unknown command, missing flag: usage error 2
    assert "usage: megatron-lc" in result["out"], result["out"]
    print(f"{' '.join(argv) or '(none)'}: {seconds:.2f} s")


def test_each_command_still_builds_its_full_parser():
    """The lazy table loses nothing: building every subcommand's parser imports each module and finds its flags."""
    from megatron_lc.cli import COMMANDS, build_parser

    _, subparsers = build_parser()
    assert set(subparsers) == set(COMMANDS)
    assert "--config" in subparsers["train"].format_help() and "--from" in subparsers["convert"].format_help()
