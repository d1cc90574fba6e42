"""`megatron-lc demo`: byte tokenizer, stdlib docstring corpus, a short training run, the CLI and --out."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_lc.cli import main
from megatron_lc.demo import ByteTokenizer, add_demo_args, build_corpus, lr_at, run_demo
from megatron_lc.model import load_hf


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_args(parser)
    return parser.parse_args(list(argv))


def test_byte_tokenizer_round_trips_text_and_skips_specials():
    tok = ByteTokenizer()
    text = "Return the café's 数据 — ok ✓\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.EOS] + ids + [tok.PAD, tok.BOS]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    assert max(tok.BOS, tok.EOS, tok.PAD) < tok.vocab_size == 260


def test_build_corpus_is_nonempty_deterministic_and_capped():
    docs = build_corpus(200_000)
    assert len(docs) > 50
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(len(d.encode("utf-8")) for d in docs) <= 200_000
    assert len(set(docs)) == len(docs)
    assert build_corpus(200_000) == docs
    assert build_corpus(100_000) == docs[:len(build_corpus(100_000))]  # a smaller cap takes a prefix


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    peak, total, warmup = 2e-3, 100, 5
    lrs = [lr_at(s, total, peak, warmup) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))
    assert lrs[-1] == pytest.approx(0.1 * peak)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    args = demo_args("--steps", "40", "--seq-len", "64", "--batch-size", "8", "--eval-every", "20",
                     "--eval-windows", "8", "--corpus-mb", "0.5", "--max-new-tokens", "24", "--out", out)
    return run_demo(args), out


def test_short_run_lowers_the_validation_loss_and_generates(short_run):
    result, _ = short_run
    # Before training the model predicts about uniformly over the 260 ids: ln(260) = 5.56 nats.
    assert abs(result["initial_val_loss"] - math.log(260)) < 0.3
    # 40 steps learn at least the byte frequencies (~3.3 nats measured); a broken loop stays near 5.5.
    assert result["final_val_loss"] < result["initial_val_loss"] - 1.5
    assert result["steps"] == 40 and not result["stopped_early"]
    assert [s for s, _ in result["val_losses"]] == [0, 20, 40]
    assert result["tokens_per_s"] > 0
    for prompt, text in result["samples"].items():
        assert text.startswith(prompt) and len(text) > len(prompt)


def test_out_folder_reloads_with_identical_logits_and_has_metrics(short_run):
    result, out = short_run
    model = result["model"].eval()
    loaded = load_hf(out).eval()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config.extra == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert sum(r["kind"] == "train" for r in records) == 40
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 20, 40]
    assert records[-1]["kind"] == "final" and records[-1]["final_val_loss"] == result["final_val_loss"]


def test_minutes_caps_training_and_says_so(capsys):
    # A cap far below one step stops after the first step (then still evaluates and generates).
    result = run_demo(demo_args("--steps", "1000", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2",
                                "--corpus-mb", "0.2", "--minutes", "0.0001", "--max-new-tokens", "4"))
    assert result["steps"] == 1 and result["stopped_early"]
    assert "--minutes 0.0001 reached" in capsys.readouterr().out


def test_cli_help_lists_demo():
    proc = subprocess.run([sys.executable, "-m", "megatron_lc.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout


def test_cli_without_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--seq-len", "0"), ("--steps", "-1"), ("--batch-size", "0"),
                                         ("--lr", "0"), ("--temperature", "-1"), ("--minutes", "0")])
def test_cli_bad_flag_is_a_usage_error_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["demo", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_default_demo_command_end_to_end(tmp_path):
    """README's main job as a user runs it: the console script, default settings (~3.5 min on 2 cores)."""
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "megatron-lc")
    proc = subprocess.run([exe, "demo", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["steps"] == 400
    # measured: 5.41 -> 1.69 nats/byte (2026-11-24, 2 CPU cores); 2.0 leaves room for thread-count noise
    assert final["initial_val_loss"] > 5.0 and final["final_val_loss"] < 2.0, final
    assert "generating" in proc.stdout and "--- 'Return the '" in proc.stdout
