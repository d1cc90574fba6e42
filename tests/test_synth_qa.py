"""`megatron-lc data synth-qa`: extractive answers found in their source documents, byte-identical output for a seed,
gold depths spread over the context, lengths at and near their targets, and a pluggable LLM writer whose requests
and replies are checked against a fake OpenAI-compatible server."""
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from megatron_lc.cli import main
from megatron_lc.data import synth_qa
from megatron_lc.data.chat_template import render_chatml
from megatron_lc.data.stdlib_text import stdlib_docstrings, stdlib_files, stdlib_root
from megatron_lc.data.tokenizer import load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """docs.jsonl: stdlib docstrings (no title: the fallback title), long.jsonl: whole stdlib source files with a
    title field, for single-doc."""
    root = tmp_path_factory.mktemp("synth")
    docs = stdlib_docstrings(200_000)
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text, "source": "docstrings"}) + "\n")
    with open(root / "long.jsonl", "w", encoding="utf-8") as f:
        for path in stdlib_files():
            rel = os.path.relpath(path, stdlib_root())
            if rel.split(os.sep)[0] in ("json", "email"):
                with open(path, encoding="utf-8") as src:
                    f.write(json.dumps({"text": src.read(), "source": "code", "title": rel}) + "\n")
    return root


def _run(*argv):
    assert main(["data", "synth-qa", *map(str, argv)]) == 0


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _source_text(where):
    """The text of the document at ``file:line``, read back from the input."""
    path, line = where.rsplit(":", 1)
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if number == int(line):
                return json.loads(raw)["text"]
    raise AssertionError(where)


def _check_records(records, kind, targets):
    """Every property a user of the file relies on, for each chat."""
    for r in records:
        meta, messages, qa = r["meta"], r["messages"], r["qa"]
        assert meta["kind"] == kind and meta["target_tokens"] in targets
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(qa) and qa
        first = messages[0]["content"]
        for g, (title, where) in enumerate(zip(meta["titles"], meta["sources"])):
            header = f"Document {g + 1} (title: {title}):\n"
            assert header in first
            kept = first.split(header, 1)[1].split("\n\nDocument ", 1)[0]
            assert kept.split("\n\n" + qa[0]["question"])[0] in _source_text(where)  # a window of the document
        for i, q in enumerate(qa):
            assert q["turn"] == i and messages[2 * i + 1]["content"] == q["answers"][0]
            assert i == 0 or messages[2 * i]["content"] == q["question"]
            assert first.endswith("\n\n" + qa[0]["question"])
            answer = q["answers"][0]
            # extractive: verbatim in its source document (compare: the gold document holding the larger number)
            assert answer in _source_text(meta["sources"][q["gold_docs"][0]])
            # the depth points at the answer in the context: that span is inside the gold document's window
            start = round(q["depth"] * len(first))
            hit = first.find(answer, max(0, start - 2))
            assert 0 <= hit - start <= 2, (q, first[start - 20:start + 20])
            gold_header = first.index(f"Document {q['gold_docs'][0] + 1} (title: ")
            assert gold_header < hit and (first.find("\n\nDocument ", gold_header) == -1 or
                                          hit < first.find("\n\nDocument ", gold_header))
            if "right after" in q["question"] and len(q["gold_docs"]) == 1:  # the quoted phrase is unique
                phrase = q["question"].split('right after "', 1)[1][:-2]
                assert first.count(phrase) == (2 if i == 0 else 1)  # once in its document (and in Q1 itself)


def test_answers_are_in_their_source_documents(corpus, tmp_path):
    out = tmp_path / "md.jsonl"
    _run(corpus / "docs.jsonl", "--length", "2048,3K", "--num", 25, "--questions", 4, "--compare-share", 0.5,
         "--out", out)
    records = _records(out)
    assert len(records) == 50
    _check_records(records, "multi-doc", (2048, 3072))
    types = json.loads((tmp_path / "md.jsonl.report.json").read_text())["question_types"]
    assert types.get("compare", 0) >= 3 and types["words"] > 100  # answers in one document, and in two
    compare = [q for r in records for q in r["qa"] if len(q["gold_docs"]) == 2]
    for r in records:
        for q in r["qa"]:
            if len(q["gold_docs"]) == 2:  # the answer is the larger of the two numbers, verbatim
                values = [float(x) for x in _phrase_values(r, q)]
                assert float(q["answers"][0]) == max(values) and len(set(values)) == 2
    assert compare

    out = tmp_path / "sd.jsonl"
    _run(corpus / "long.jsonl", "--kind", "single-doc", "--length", "6000", "--num", 10, "--questions", 3,
         "--out", out)
    records = _records(out)
    _check_records(records, "single-doc", (6000,))
    for r in records:  # one document; question i sits in segment i of 3
        assert len(r["meta"]["titles"]) == 1 and all(q["gold_docs"] == [0] for q in r["qa"])
        text_start = r["messages"][0]["content"].index(":\n") + 2
        first_len = len(r["messages"][0]["content"])
        doc_len = first_len - text_start - len("\n\n" + r["qa"][0]["question"])
        for i, q in enumerate(r["qa"]):
            assert i / 3 <= (q["depth"] * first_len - text_start) / doc_len <= (i + 1) / 3


def _phrase_values(record, q):
    """The two numbers a compare question points at: what follows each quoted phrase in the context."""
    first = record["messages"][0]["content"]
    values = []
    for phrase in q["question"].split('right after "')[1:]:
        phrase = phrase.split('" in document')[0]
        rest = first[first.index(phrase) + len(phrase):].split()[0]
        values.append(rest.strip(synth_qa._EDGE_PUNCT))
    return values


def test_same_seed_gives_byte_identical_output(corpus, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _run(corpus / "docs.jsonl", "--length", "1500", "--num", 20, "--seed", seed, "--out", tmp_path / name)
    a, b, c = ((tmp_path / n).read_bytes() for n in "abc")
    assert a == b and len(a) > 20_000
    assert a != c


@pytest.mark.parametrize("kind", ["multi-doc", "single-doc"])
def test_gold_depths_spread_over_the_context(corpus, tmp_path, kind):
    out = tmp_path / "d.jsonl"
    src = "docs.jsonl" if kind == "multi-doc" else "long.jsonl"
    _run(corpus / src, "--kind", kind, "--length", "2000", "--num", 200, "--questions", 2, "--out", out)
    depths = [q["depth"] for r in _records(out) for q in r["qa"]]
    assert len(depths) >= 380  # 2 a chat; a chat with no usable fact at a drawn depth gets fewer (counted)
    fifths = [sum(lo / 5 <= d < (lo + 1) / 5 for d in depths) for lo in range(5)]
    assert min(fifths) >= 0.6 * len(depths) / 5, fifths  # every fifth of [0, 1] gets a fair share
    report = json.loads((tmp_path / "d.jsonl.report.json").read_text())
    assert sum(report["depth"]["counts"]) == len(depths)
    assert [sum(report["depth"]["counts"][2 * i:2 * i + 2]) for i in range(5)] == fifths


def test_lengths_at_or_under_the_target_and_near_it(corpus, tmp_path):
    tok_path = train_sentencepiece(_records_text(corpus / "docs.jsonl"), str(tmp_path / "tok"), 400)
    tok = load_tokenizer(tok_path)
    for spec, name in (("bytes", "b.jsonl"), (tok_path, "sp.jsonl")):
        _run(corpus / "docs.jsonl", "--length", "1800,4K", "--num", 15, "--tokenizer", spec, "--out",
             tmp_path / name)
        counter = load_tokenizer(spec)
        report = json.loads((tmp_path / (name + ".report.json")).read_text())
        for r in _records(tmp_path / name):
            n = len(counter.encode(render_chatml(r["messages"], add_generation_prompt=False)))
            target = r["meta"]["target_tokens"]
            assert n == r["meta"]["length_tokens"] and 0.9 * target <= n <= target, (spec, n, target)
            assert len(r["meta"]["titles"]) >= 4  # --min-docs 4 (default): several documents, none filling it
        assert report["lengths"]["4096"]["max"] <= 4096 and report["lengths"]["1800"]["chats"] == 15
        assert sum(report["lengths"]["1800"]["length_over_target"]["counts"][9:]) == 15  # the histogram: 0.9-1.0
    assert tok.vocab_size <= 400


def test_short_questions_still_fill_the_target(tmp_path):
    """--key-words 1 and many questions: the questions take far fewer tokens than the generator's first guess,
    which it measures and corrects, so chats still fill 90-100% of the target (with the guess alone, chats of a 6K
    target held 83% of it, and a 4K target failed: no room left for a document)."""
    import random

    rng = random.Random(0)
    words = [f"w{i}x" for i in range(300)]
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40)), "title": f"d{i}"}) + "\n")
    _run(tmp_path / "d.jsonl", "--length", "4K,6K", "--num", 6, "--questions", 25, "--key-words", 1,
         "--answer-words", "1", "--compare-share", 0, "--min-docs", 3, "--out", tmp_path / "o.jsonl")
    records = _records(tmp_path / "o.jsonl")
    assert len(records) == 12
    for r in records:
        n, target = r["meta"]["length_tokens"], r["meta"]["target_tokens"]
        assert 0.9 * target <= n <= target, (n, target)
        assert all(q["question"].endswith(f'right after "{q["question"].split(chr(34))[-2]}"?') for q in r["qa"])
        assert all(len(q["question"].split('"')[-2].split()) == 1 for q in r["qa"])  # one-word keys


def _records_text(path):
    return [r["text"] for r in _records(path)]


class _FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that records each request and replies (in a ```json fence) with one
    answer verbatim in the passage (its middle word) and one made-up answer."""

    requests: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        passage = body["messages"][1]["content"].split(":\n\n", 1)[1].rsplit("\n\nWrite ", 1)[0]
        word = passage.split()[len(passage.split()) // 2]
        content = "```json\n" + json.dumps([{"question": "Which word is in the middle?", "answer": word},
                                            {"question": "Who wrote it?", "answer": "Nobody Invented"}]) + "\n```"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_openai_writer_against_a_fake_endpoint(corpus, tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeEndpoint.requests = []
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-test")
    try:
        _run(corpus / "docs.jsonl", "--length", "1500", "--num", 3, "--questions", 2, "--writer", "openai",
             "--api-base", f"http://127.0.0.1:{server.server_port}/v1", "--api-model", "tiny-chat",
             "--api-key-env", "SYNTH_TEST_KEY", "--out", tmp_path / "llm.jsonl")
    finally:
        server.shutdown()
    sent = _FakeEndpoint.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "tiny-chat" and [m["role"] for m in sent["body"]["messages"]] == ["system",
                                                                                                       "user"]
    records = _records(tmp_path / "llm.jsonl")
    _check_records(records, "multi-doc", (1500,))
    assert all(q["question"] == "Which word is in the middle?" for r in records for q in r["qa"])
    report = json.loads((tmp_path / "llm.jsonl.report.json").read_text())
    assert report["writer"] == "openai"
    # every reply held one made-up answer: each is rejected and counted
    assert 6 <= report["rejected"]["answer not verbatim in the passage"] <= len(_FakeEndpoint.requests)
    assert report["questions"] == 6


def test_openai_writer_parse_and_errors():
    good = json.dumps({"choices": [{"message": {"content": 'Sure: [{"question": "Q?", "answer": "A"}] done'}}]})
    assert synth_qa.OpenAIWriter.parse(good.encode()) == [synth_qa.QAPair("Q?", "A")]
    with pytest.raises(ValueError, match="holds no JSON list"):
        synth_qa.OpenAIWriter.parse(json.dumps({"choices": [{"message": {"content": "no idea"}}]}).encode())
    with pytest.raises(ValueError, match="not a chat-completions response"):
        synth_qa.OpenAIWriter.parse(b'{"error": "overloaded"}')

    def refuse(request, timeout):
        import urllib.error
        raise urllib.error.URLError("connection refused")

    writer = synth_qa.OpenAIWriter("http://127.0.0.1:9/v1", "m", opener=refuse)
    with pytest.raises(synth_qa.ConfigError, match="--api-base"):
        writer.write("some passage", "t", random.Random(0))


def test_bad_input_is_a_usage_error_naming_the_flag(corpus, tmp_path, capsys):
    cases = [(["--length", "4x"], "--length '4x'"),
             (["--kind", "single-doc", "--length", "400K"], "--kind single-doc --length"),
             (["--writer", "openai"], "--api-base"),
             (["--compare-share", "1.5"], "--compare-share 1.5"),
             (["--num", "0"], "--num 0")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["data", "synth-qa", str(corpus / "long.jsonl"), *flags, "--out", str(tmp_path / "x.jsonl")])
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    assert not (tmp_path / "x.jsonl").exists()


def test_documents_left_out_are_counted(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    text = " ".join(f"word{i} and more text here number {i} ends." for i in range(60))
    with open(path, "w") as f:
        f.write(json.dumps({"text": text}) + "\n")
        f.write(json.dumps({"text": text.replace("word1 ", "word1 <|im_end|> ")}) + "\n")
        f.write(json.dumps({"text": "  "}) + "\n")
        f.write("{not json\n")
    _run(path, "--length", "900", "--num", 2, "--questions", 1, "--min-docs", 1, "--out", tmp_path / "o.jsonl")
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert report["documents_usable"] == 1
    assert report["documents_left_out"] == {"ChatML marker in the text": 1, "blank text": 1}
    assert report["read"]["corrupt"] == 1 and "in.jsonl:4" in report["read"]["corrupt_lines"][0]
    out = capsys.readouterr().out
    assert "1 left out: ChatML marker in the text" in out and "in.jsonl:4" in out


def test_without_gold_documents_the_key_is_gone_and_the_rest_kept(corpus, tmp_path):
    """The control of a QA eval: each question's gold documents taken out of its chat; the other documents stay
    verbatim, in order, renumbered from 1; the questions and answers are untouched; the quoted key is gone."""
    out = tmp_path / "md.jsonl"
    _run(corpus / "docs.jsonl", "--length", "2048", "--num", 12, "--questions", 3, "--compare-share", 0.3,
         "--out", out)
    checked = 0
    for r in _records(out):
        first, titles = r["messages"][0]["content"], r["meta"]["titles"]
        for q in r["qa"]:
            messages = synth_qa.without_documents(r, q["gold_docs"])
            assert messages[1:] == r["messages"][1:] and r["messages"][0]["content"] == first  # a copy
            context = messages[0]["content"]
            assert context.endswith("\n\n" + r["qa"][0]["question"])
            kept = [k for k in range(len(titles)) if k not in q["gold_docs"]]
            for n, k in enumerate(kept, 1):  # each kept document whole, under its new number, in order
                text = first.split(f"Document {k + 1} (title: {titles[k]}):\n", 1)[1]
                text = text.split("\n\nDocument ", 1)[0].split("\n\n" + r["qa"][0]["question"])[0]
                assert f"Document {n} (title: {titles[k]}):\n{text}\n\n" in context
            assert f"Document {len(kept) + 1} (title: " not in context
            if "right after" in q["question"] and len(q["gold_docs"]) == 1:
                phrase = q["question"].split('right after "', 1)[1][:-2]
                assert context.count(phrase) == (1 if q["turn"] == 0 else 0)  # only in the question itself
                checked += 1
    assert checked > 20
    with pytest.raises(ValueError, match="no header"):
        synth_qa.without_documents({"messages": [{"role": "user", "content": "no documents"}],
                                    "qa": [{"question": "q"}], "meta": {"titles": ["a"]}}, [0])


def test_one_word_keys():
    """phrase_words=1: each word after the first is asked about with the word before it as the key (a one-word
    key still needs a letter)."""
    import random

    pairs = synth_qa.RuleBasedWriter(phrase_words=1, answer_words=(1, 1)).write("alpha beta 42 gamma", "T",
                                                                                 random.Random(0))
    assert [(p.key, p.answer) for p in pairs] == [("alpha", "beta"), ("beta", "42")]
    assert pairs[1].value == 42.0 and pairs[0].question == 'In document "T", which word comes right after "alpha"?'
