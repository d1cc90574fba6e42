"""The data pipeline end to end: reading JSONL with corrupt lines reported, cleaning + dedup, tokenizing with workers
into .bin/.idx, mixing with a report, and the `megatron-lc data` command."""
import gzip
import json
import random

import numpy as np
import pytest

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data import pipeline
from megatron_lc.data.documents import ReadReport, iter_documents
from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lc.data.tokenizer import Bytes

WORDS = ("river mill stone bread market winter harbor lantern garden letter window engine orchard valley candle "
         "bridge forest meadow silver copper doctor teacher farmer sailor painter").split()


def prose(rng, sentences):
    """Clean English-like prose: sentences of 6-14 words, each ending in a period, a paragraph every 4 sentences."""
    out = []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + ".")
        if i % 4 == 3:
            out.append("\n")
    return " ".join(out).replace(" \n ", "\n").strip()


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# ---- reading ----------------------------------------------------------------------------------------------------
def test_corrupt_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "web.jsonl"
    write_jsonl(path, [{"text": "good one", "source": "cc"}, "{not json", "", "[1, 2]", {"body": "no text field"},
                       {"text": 7}, {"text": "no source field"}])
    with open(path, "ab") as f:
        f.write(b'{"text": "bad utf8 \xff\xfe"}\n')
    report = ReadReport()
    docs = list(iter_documents([str(path)], report=report))
    assert [d.text for d in docs] == ["good one", "no source field"]
    assert [d.source for d in docs] == ["cc", "web"]  # no source field: the file's name
    assert docs[1].where == f"{path}:7"
    assert report.lines == 8 and report.documents == 2 and report.blank == 1 and report.corrupt == 5
    assert report.documents + report.blank + report.corrupt == report.lines
    assert report.source_from_file == 1
    for listed, (line, reason) in zip(report.corrupt_lines, ((2, "bad JSON"), (4, "a JSON list, not an object"),
                                                              (5, "no 'text' field"), (6, "not a string"),
                                                              (8, "not UTF-8"))):
        assert listed.startswith(f"{path}:{line}: ") and reason in listed, listed
    with pytest.raises(ConfigError, match=rf"{path}:2: bad JSON"):
        list(iter_documents([str(path)], on_error="fail"))


def test_truncated_gzip_is_reported_not_dropped(tmp_path):
    full = tmp_path / "full.jsonl.gz"
    write_jsonl(full, [{"text": f"document {i} " * 50} for i in range(200)], gz=True)
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    report = ReadReport()
    docs = list(iter_documents([str(cut)], report=report))
    assert 0 < len(docs) < 200
    assert report.corrupt == 1 and f"{cut}:{len(docs) + 1}: unreadable from here on" in report.corrupt_lines[0]
    assert report.documents + report.blank + report.corrupt == report.lines
    with pytest.raises(ConfigError, match="unreadable"):
        list(iter_documents([str(cut)], on_error="fail"))


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        list(iter_documents([str(tmp_path / "missing.jsonl")]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type"):
        list(iter_documents([str(tmp_path / "notes.txt")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        list(iter_documents([str(tmp_path / "empty")]))


# ---- tokenize ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources in two files (one gzipped), one corrupt line each."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    books = [{"text": prose(rng, rng.randint(20, 60)), "source": "books"} for _ in range(40)]
    web = [{"text": prose(rng, rng.randint(2, 8))} for _ in range(120)]
    write_jsonl(d / "books.jsonl", books[:20] + ["{broken"] + books[20:])
    write_jsonl(d / "web.jsonl.gz", web[:60] + ['{"text": 3}'] + web[60:], gz=True)
    return d, books, web


@pytest.mark.parametrize("workers", [0, 2])
def test_tokenize_writes_documents_with_eos_and_sources(corpus, tmp_path, workers):
    d, books, web = corpus
    report = pipeline.tokenize_corpus([str(d)], "bytes", str(tmp_path / "tok"), workers=workers, progress=False)
    data = IndexedDataset(tmp_path / "tok")
    tok = Bytes()
    texts = [r["text"] for r in books] + [r["text"] for r in web]  # folder order: books.jsonl, web.jsonl.gz
    assert len(data) == len(texts) == report["documents"]
    for i, text in enumerate(texts):
        assert data.get(i).tolist() == tok.encode(text) + [tok.eos_token_id]
    assert [data.source_names[s] for s in data.sources] == ["books"] * 40 + ["web"] * 120
    assert report["read"]["corrupt"] == 2 and report["tokens"] == data.num_tokens
    assert data.meta["eos_token_id"] == tok.eos_token_id


def test_workers_do_not_change_the_output(corpus, tmp_path):
    from megatron_lc.data.tokenizer import train_sentencepiece

    d, books, _ = corpus
    model = train_sentencepiece([r["text"] for r in books], str(tmp_path / "sp"), vocab_size=400, seed=0,
                                num_threads=1)
    for workers in (0, 2):
        pipeline.tokenize_corpus([str(d)], model, str(tmp_path / f"w{workers}"), workers=workers, progress=False,
                                 batch_bytes=4096)
    a, b = (tmp_path / "w0.bin").read_bytes(), (tmp_path / "w2.bin").read_bytes()
    assert a == b and len(a) > 0
    assert (tmp_path / "w0.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()


# ---- clean + dedup ----------------------------------------------------------------------------------------------
def test_clean_corpus_report_adds_up(tmp_path):
    rng = random.Random(1)
    good = [prose(rng, 12) for _ in range(30)]
    records = [{"text": t, "source": "web"} for t in good]
    records += [{"text": good[0], "source": "web"}, {"text": good[1], "source": "web"}]  # exact duplicates
    near = good[2].split(" ")
    near[5] = "lighthouse"
    records.append({"text": " ".join(near), "source": "web"})  # one word changed: a near duplicate
    records.append({"text": "buy now!!! ??? ... !!! ,,, ;;; ::: !!!", "source": "spam"})  # punctuation soup
    records.append({"text": "\n".join(["Short line"] * 30), "source": "spam"})
    write_jsonl(tmp_path / "in.jsonl", records + ["not json"])
    report = pipeline.clean_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), workers=2, progress=False)
    read, cleaning, dedup = report["read"], report["cleaning"], report["dedup"]
    assert read["documents"] == 35 and read["corrupt"] == 1
    assert cleaning["total"] == 35 and cleaning["kept"] + sum(cleaning["removed"].values()) == 35
    assert sum(cleaning["removed"].values()) >= 2  # both spam documents
    assert dedup["exact_removed"] == 2 and dedup["near_removed"] == 1
    out = [json.loads(line) for line in (tmp_path / "out" / "deduped.jsonl").read_text().splitlines()]
    assert len(out) == report["written"] == dedup["documents_out"]
    assert dedup["documents_in"] == cleaning["kept"]
    assert {r["source"] for r in out} == {"web"}
    assert json.loads((tmp_path / "out" / "clean_report.json").read_text())["written"] == len(out)


# ---- mix --------------------------------------------------------------------------------------------------------
def _synthetic_dataset(prefix, rng):
    """Three sources with known length profiles; tokens are the document's index mod 200, then EOS 257."""
    profiles = {"books": (6000, 0.8), "web": (900, 0.6), "code": (1500, 1.0)}
    counts = {"books": 150, "web": 1500, "code": 400}
    with IndexedDatasetWriter(prefix, vocab_size=260) as w:
        for name, (median, sigma) in profiles.items():
            for _ in range(counts[name]):
                n = max(8, int(rng.lognormal(np.log(median), sigma)))
                w.add_document(np.append(np.full(n - 1, rng.integers(0, 200)), 257), name)
        w.finalize({"eos_token_id": 257, "vocab_size": 260})


def test_mix_per_source_hits_the_targets_and_writes_the_report(tmp_path):
    _synthetic_dataset(str(tmp_path / "tok"), np.random.default_rng(0))
    report = pipeline.mix_dataset(str(tmp_path / "tok"), str(tmp_path / "mixed"), long_threshold=4096,
                                  long_share=0.7, seed=3)
    before, after = report["before"]["sources"], report["after"]["sources"]
    for name in before:
        assert abs(after[name]["token_share"] - before[name]["token_share"]) <= 0.01
        assert abs(after[name]["long_share"] - 0.7) <= 0.03
    mixed = IndexedDataset(tmp_path / "mixed")
    # What was written is what the stats say.
    lengths, names = np.asarray(mixed.sequence_lengths), np.asarray(mixed.source_names)[mixed.sources]
    for name in before:
        mine = lengths[names == name]
        assert mine.sum() == after[name]["tokens"]
        assert mine[mine > 4096].sum() == after[name]["long_tokens"]
    for f in ("mixture.json", "mixture.txt", "mixture_lengths.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "books" in (tmp_path / "mixture.txt").read_text()


def test_mix_cut_pieces_end_in_eos(tmp_path):
    _synthetic_dataset(str(tmp_path / "tok"), np.random.default_rng(1))
    source = IndexedDataset(tmp_path / "tok")
    pipeline.mix_dataset(str(tmp_path / "tok"), str(tmp_path / "cut"), "cut", cut_length=1024)
    cut = IndexedDataset(tmp_path / "cut")
    assert cut.sequence_lengths.max() <= 1024
    assert all(cut.get(i)[-1] == 257 for i in range(len(cut)))
    def content(d):
        return sum(int((d.get(i) != 257).sum()) for i in range(len(d)))

    assert content(cut) == content(source)  # nothing lost, only EOS added at cuts


def test_mix_needs_sources(tmp_path):
    with IndexedDatasetWriter(tmp_path / "plain", vocab_size=260) as w:
        w.add_document([1, 2, 257])
    with pytest.raises(ConfigError, match="no sources sidecar"):
        pipeline.mix_dataset(str(tmp_path / "plain"), str(tmp_path / "out"))


# ---- the command ------------------------------------------------------------------------------------------------
def test_cli_clean_tokenize_mix(corpus, tmp_path, capsys):
    d, _, _ = corpus
    assert main(["data", "clean", str(d), "--out", str(tmp_path / "clean"), "--workers", "1"]) == 0
    assert main(["data", "tokenize", str(tmp_path / "clean" / "deduped.jsonl"), "--tokenizer", "bytes",
                 "--out", str(tmp_path / "tok"), "--workers", "1"]) == 0
    assert main(["data", "mix", str(tmp_path / "tok"), "--out", str(tmp_path / "mixed"), "--long-threshold", "400",
                 "--long-share", "0.5", "--keep-long-sources"]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "share before" in out
    mixed = IndexedDataset(tmp_path / "mixed")
    assert set(mixed.source_names) == {"books", "web"} and mixed.num_tokens > 0


def test_cli_bad_weights_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "mix", str(tmp_path / "x"), "--out", str(tmp_path / "y"), "--weights", "books"])
    assert e.value.code == 2
    assert "SOURCE=WEIGHT" in capsys.readouterr().err


def test_bench_reports_both_throughputs(corpus, tmp_path):
    d, _, _ = corpus
    result = pipeline.bench_tokenize([str(d)], "bytes", str(tmp_path / "bench"), workers=1)
    assert result["library_mb_per_s"] > 0 and result["pipeline_mb_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pipeline_mb_per_s"] / result["library_mb_per_s"], rel=1e-9)
    assert result["bytes"] == sum(len(r["text"].encode()) for r in corpus[1] + corpus[2])


def test_cli_clean_rules_file(tmp_path, capsys):
    rng = random.Random(2)
    write_jsonl(tmp_path / "in.jsonl", [{"text": prose(rng, 8)} for _ in range(5)] +
                [{"text": "\n".join(["tiny"] * 20)}])
    (tmp_path / "off.yaml").write_text("max_short_paragraph_ratio: null\nmax_top_ngram_char_ratio: null\n"
                                       "max_duplicate_sentence_ratio: null\nmax_no_end_punct_ratio: null\n")
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "a"), "--workers", "0",
                 "--no-sentence", "--paragraph-fraction", "0"]) == 0
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "b"), "--workers", "0",
                 "--rules", str(tmp_path / "off.yaml"), "--no-sentence", "--paragraph-fraction", "0"]) == 0
    kept = [json.loads((tmp_path / d / "clean_report.json").read_text())["cleaning"]["kept"] for d in "ab"]
    assert kept == [5, 6]  # the one-word-lines document passes once its rules are off
    (tmp_path / "bad.yaml").write_text("max_punctuaton_ratio: 0.1\n")
    with pytest.raises(SystemExit):
        main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "c"), "--rules",
              str(tmp_path / "bad.yaml")])
    assert "did you mean 'max_punctuation_ratio'" in capsys.readouterr().err


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"content": ["first text", None, "third text"], "domain": ["a", "b", None]})
    pq.write_table(table, tmp_path / "part.parquet")
    report = ReadReport()
    docs = list(iter_documents([str(tmp_path / "part.parquet")], text_key="content", source_key="domain",
                               report=report))
    assert [(d.text, d.source, d.where) for d in docs] == [("first text", "a", f"{tmp_path / 'part.parquet'}:1"),
                                                          ("third text", "part", f"{tmp_path / 'part.parquet'}:3")]
    assert report.corrupt == 1 and report.lines == 3 and report.documents == 2
    assert f"{tmp_path / 'part.parquet'}:2: 'content' is NoneType" in report.corrupt_lines[0]
    with pytest.raises(ConfigError, match="no 'text' column"):
        list(iter_documents([str(tmp_path / "part.parquet")]))


def test_cli_train_tokenizer_then_bench(corpus, tmp_path, capsys):
    from megatron_lc.data.tokenizer import load_tokenizer

    d, books, _ = corpus
    assert main(["data", "train-tokenizer", str(d), "--vocab-size", "400", "--out", str(tmp_path / "sp"),
                 "--workers", "1"]) == 0
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 400 and tok.decode(tok.encode(books[0]["text"])) == books[0]["text"]
    assert main(["data", "bench", str(d), "--tokenizer", str(tmp_path / "sp.model"), "--out", str(tmp_path / "b"),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 corrupt" in out and "tokenize+pack" in out
    assert IndexedDataset(tmp_path / "b").meta["eos_token_id"] == tok.eos_token_id
