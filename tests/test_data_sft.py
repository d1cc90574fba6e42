"""`megatron-lc data sft`: chats in both input forms -> an SFT dataset whose answer tokens are exactly the assistant
replies, a report whose counts add up, every malformed record reported with file:line, too-long chats refused or
cut from the left, and a cut input file ending with INPUT LOST."""
import gzip
import json

import numpy as np
import pytest

from megatron_lc.cli import main
from megatron_lc.data.chat_data import TOO_LONG_ANSWER_CUT
from megatron_lc.data.documents import INPUT_LOST_STATUS
from megatron_lc.data.sft_format import SFTDataset, aligned_labels
from megatron_lc.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_lc.ops.cross_entropy import IGNORE_INDEX

TALK = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("And of Italy?", "Rome."),
    ("How many legs has a spider?", "Eight legs."),
    ("Translate 'cat' to German.", "Katze"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = [f"{q}\n{a}\nYou are a helpful assistant.\nuser\nassistant\nsystem\n" for q, a in TALK] * 20
    return train_sentencepiece(text, str(tmp_path_factory.mktemp("tok") / "sp"), 400, seed=0, num_threads=1)


def _openai(turns, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def _sharegpt(turns):
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


def _write(path, lines):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def _sft(*args):
    return main(["data", "sft", *map(str, args), "--no-progress"])


def _report(prefix):
    return json.loads((prefix.parent / (prefix.name + ".report.json")).read_text())


def test_sft_writes_dataset_whose_answer_tokens_are_the_replies(tokenizer, tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [_openai(TALK, system="Answer briefly."), "", _openai(TALK[2:3])])
    b = _write(tmp_path / "b.jsonl.gz", [_sharegpt(TALK[:2])])
    out = tmp_path / "sft"
    assert _sft(a, b, "--tokenizer", tokenizer, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}.bin/.idx (tokens), {out}.answer.bin/.idx (answer mask) and {out}.report.json" in printed
    assert "wrote 3 chats" in printed
    report = _report(out)
    ds = SFTDataset(out)
    tok = load_tokenizer(tokenizer)
    assert len(ds) == report["written"] == report["chats_read"] == 3 and report["read"]["blank"] == 1
    answers = [[a for _, a in TALK], [TALK[2][1]], [a for _, a in TALK[:2]]]
    label_count = 0
    for i, replies in enumerate(answers):
        ids, mask = ds.get(i)
        # every maximal run of answer tokens is one reply with its <|im_end|>, and there is one run per reply
        edges = np.flatnonzero(np.diff(mask.astype(int))) + 1
        runs = [tok.decode(r) for r, m in zip(np.split(ids, edges), np.split(mask, edges)) if m[0]]
        assert runs == [r + "<|im_end|>" for r in replies]
        labels = aligned_labels(ids, mask)
        assert np.array_equal(labels[:-1][mask[1:]], ids[1:][mask[1:]])
        label_count += int((labels != IGNORE_INDEX).sum())
    assert label_count == report["answer_tokens"] == ds.meta["answer_tokens"]
    assert report["tokens"] == int(ds.lengths.sum())
    assert sum(report["length_histogram"].values()) == 3
    text0 = tok.decode(ds.get(0)[0])
    assert text0.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(ds.get(2)[0]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")

    # ShareGPT and OpenAI forms of one chat give the same tokens; the system flags change the default system turn
    assert _sft(_write(tmp_path / "c.jsonl", [_openai(TALK[:2])]), "--tokenizer", tokenizer, "--out",
                tmp_path / "same") == 0
    assert np.array_equal(SFTDataset(tmp_path / "same").get(0)[0], ds.get(2)[0])
    assert _sft(b, "--tokenizer", tokenizer, "--out", tmp_path / "nosys", "--no-default-system") == 0
    assert tok.decode(SFTDataset(tmp_path / "nosys").get(0)[0]).startswith("<|im_start|>user\n")
    assert _sft(b, "--tokenizer", tokenizer, "--out", tmp_path / "sys", "--system", "Be terse.") == 0
    assert tok.decode(SFTDataset(tmp_path / "sys").get(0)[0]).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert _sft(a, "--tokenizer", tokenizer, "--out", tmp_path / "last", "--last-turn-only") == 0
    ids, mask = SFTDataset(tmp_path / "last").get(0)
    assert tok.decode(ids[mask]) == TALK[-1][1] + "<|im_end|>"


BAD = [
    ('{"messages": [', "bad JSON"),
    ('["a list"]', "not an object"),
    ({"text": "no chat here"}, "no turns field"),
    ({"messages": "hello"}, "no turns field"),
    ({"messages": [{"role": "user"}]}, "bad turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}, "unknown role"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "unknown role"),
    ({"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}]},
     "non-text content"),
    ({"messages": [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}]},
     "ChatML marker in content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "turns out of order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y"}]}, "turns out of order"),
    ({"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}, "turns out of order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "unanswered"}]}, "turns out of order"),
]


def test_every_malformed_record_is_reported_with_file_and_line(tokenizer, tmp_path, capsys):
    path = _write(tmp_path / "mixed.jsonl", [_openai(TALK[:1])] + [line for line, _ in BAD] + [_sharegpt(TALK[1:2])])
    out = tmp_path / "out"
    assert _sft(path, "--tokenizer", tokenizer, "--out", out) == 0
    report = _report(out)
    want: dict[str, list[str]] = {}
    for number, (_, kind) in enumerate(BAD, 2):
        want.setdefault(kind, []).append(f"{path}:{number}")
    got = report["dropped"]["by_reason"]
    assert {kind: row["count"] for kind, row in got.items()} == {kind: len(w) for kind, w in want.items()}
    for kind, wheres in want.items():
        assert [line.split(": ")[0] for line in got[kind]["first"]] == wheres, kind
    read = report["read"]
    assert report["written"] == 2 and read["corrupt"] == len(BAD) == report["dropped"]["total"]
    assert read["lines"] == read["documents"] + read["blank"] + read["corrupt"]
    printed = capsys.readouterr().out
    assert f"3 unknown role: {path}:7: turn 1 has role 'tool'" in printed

    with pytest.raises(SystemExit) as e:
        _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "fail", "--on-error", "fail")
    assert e.value.code == 2
    assert f"{path}:2: bad JSON" in capsys.readouterr().err
    assert not (tmp_path / "fail.idx").exists()


def test_too_long_chats_error_or_are_cut_from_the_left(tokenizer, tmp_path, capsys):
    tok = load_tokenizer(tokenizer)
    chats = [_openai(TALK[1:2]),  # fits
             _openai(TALK[1:2], system="You are a helpful assistant. " * 12),  # long context, short answer: cut
             _openai(TALK),  # answers from the start: dropped, unless only the last turn carries loss
             _openai([("Now a long one please.", " ".join(a for _, a in TALK) * 3)])]  # the answer alone is too long
    path = _write(tmp_path / "chats.jsonl", chats)
    out = tmp_path / "cut"
    assert _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "full") == 0
    full = SFTDataset(tmp_path / "full")
    limit = int(full.lengths[0]) + 10
    assert (full.lengths[1:] > limit).all()

    with pytest.raises(SystemExit):
        _sft(path, "--tokenizer", tokenizer, "--out", out, "--max-tokens", limit)
    err = capsys.readouterr().err
    assert f"{path}:2: this chat has {full.lengths[1]} tokens, over --max-tokens {limit}" in err
    assert "--truncate left" in err and not (tmp_path / "cut.idx").exists()

    assert _sft(path, "--tokenizer", tokenizer, "--out", out, "--max-tokens", limit, "--truncate", "left") == 0
    report = _report(out)
    assert (report["too_long"], report["truncated"], report["written"]) == (3, 1, 2)
    dropped = report["dropped"]["by_reason"][TOO_LONG_ANSWER_CUT]
    assert dropped["count"] == 2 and [w.split(": ")[0] for w in dropped["first"]] == [f"{path}:3", f"{path}:4"]
    cut = SFTDataset(out)
    ids, mask = cut.get(1)
    assert len(ids) == limit and np.array_equal(ids, full.get(1)[0][-limit:])
    assert np.array_equal(mask, full.get(1)[1][-limit:]) and tok.decode(ids[mask]) == TALK[1][1] + "<|im_end|>"
    assert report["answer_tokens"] == sum(int((aligned_labels(*cut.get(i)) != IGNORE_INDEX).sum()) for i in range(2))
    assert "3 over --max-tokens, 1 of them truncated" in capsys.readouterr().out

    # with loss on the last turn only, earlier answers may go: the multi-turn chat is cut, not dropped
    assert _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "last", "--max-tokens", limit, "--truncate",
                "left", "--last-turn-only") == 0
    report = _report(tmp_path / "last")
    assert (report["truncated"], report["written"]) == (2, 3)
    ids, mask = SFTDataset(tmp_path / "last").get(2)
    assert len(ids) == limit and tok.decode(ids[mask]) == TALK[-1][1] + "<|im_end|>"


def test_bad_flags_and_tokenizer_fail_before_work(tokenizer, tmp_path, capsys):
    path = _write(tmp_path / "c.jsonl", [_openai(TALK[:1])])
    for args, message in ((["--truncate", "left"], "--truncate left needs --max-tokens"),
                          (["--max-tokens", "1"], "--max-tokens 1"),
                          (["--tokenizer", "bytes"], "tokenizer bytes has no <|im_start|> or <|im_end|>")):
        with pytest.raises(SystemExit):
            _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "x", *args)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _sft(tmp_path / "missing.jsonl", "--tokenizer", tokenizer, "--out", tmp_path / "x")
    assert "no such file" in capsys.readouterr().err


def test_a_cut_gzip_input_ends_with_input_lost(tokenizer, tmp_path, capsys):
    path = tmp_path / "cut.jsonl.gz"
    _write(path, [_openai([TALK[i % 4]]) for i in range(400)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "o") == INPUT_LOST_STATUS
    printed = capsys.readouterr().out
    assert "INPUT LOST" in printed
    report = _report(tmp_path / "o")
    assert report["dropped"]["by_reason"]["unreadable"]["count"] == 1 and 0 < report["written"] < 400
    assert _sft(path, "--tokenizer", tokenizer, "--out", tmp_path / "o", "--allow-partial-input") == 0
