"""Issue 17, the data stages as a user runs them on a real corpus: `data mix` on sources without long documents,
paragraph/sentence dedup and cleaning per source kind (code or prose) on the standard library's own files, extra
record fields kept, the `data tokenize --val-fraction` split, and the mixture plot's legend."""
import json
import os

import numpy as np
import pytest

from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data import pipeline
from megatron_lc.data.clean import CleaningRules, SourceKinds, guess_kind
from megatron_lc.data.documents import iter_documents
from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lc.data.mixture import plan_mixture, plot_lengths
from megatron_lc.data.stdlib_text import stdlib_docstrings, stdlib_files, stdlib_root


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- (2) data mix on sources without long documents -------------------------------------------------------------
def _dataset(prefix, profiles, seed=0):
    """A tokenized dataset with sources of (documents, median length, sigma); EOS 257."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, vocab_size=260) as w:
        for name, (count, median, sigma) in profiles.items():
            for _ in range(count):
                n = max(8, int(rng.lognormal(np.log(median), sigma)))
                w.add_document(np.append(np.full(n - 1, rng.integers(0, 200)), 257), name)
        w.finalize({"eos_token_id": 257, "vocab_size": 260})


# "books" has long documents; the three small code-like sources have none above 4096 tokens, "scrolls" only long
PROFILES = {"books": (60, 6000, 0.8), "lib-a": (120, 400, 0.5), "lib-b": (80, 300, 0.5), "lib-c": (50, 200, 0.4),
            "scrolls": (6, 20000, 0.1)}


def test_mix_goes_on_when_sources_have_no_long_documents_and_reports_them(tmp_path, capsys):
    _dataset(str(tmp_path / "tok"), PROFILES)
    status = main(["data", "mix", str(tmp_path / "tok"), "--out", str(tmp_path / "mixed"),
                   "--strategy", "per_source_upsample", "--long-share", "0.7"])
    assert status == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "mixture.json").read_text())
    assert set(report["own_profile"]) == {"lib-a", "lib-b", "lib-c", "scrolls"}
    after = report["after"]["sources"]
    for name in ("lib-a", "lib-b", "lib-c"):
        assert report["own_profile"][name] == 0.0 == after[name]["long_share"]
        assert f"  {name}: long share 0.0%" in out
    assert after["scrolls"]["long_share"] == 1.0 and "  scrolls: long share 100.0%" in out
    assert abs(after["books"]["long_share"] - 0.7) <= 0.03  # the source that can take the target does
    before = report["before"]["sources"]
    for name in before:  # every source keeps its token share
        assert abs(after[name]["token_share"] - before[name]["token_share"]) <= 0.01, name
    assert "4 source(s) kept their own length profile" in out
    assert "lib-a: long share 0.0% (no document above --long-threshold 4096 tokens)" in out
    assert "scrolls: long share 100.0% (only documents above --long-threshold 4096 tokens)" in out
    mixed = IndexedDataset(tmp_path / "mixed")
    assert set(mixed.source_names) == set(PROFILES)


def test_mix_errors_name_flags_list_every_source_and_show_the_stage_usage(tmp_path, capsys):
    _dataset(str(tmp_path / "tok"), PROFILES)
    with pytest.raises(SystemExit) as e:
        main(["data", "mix", str(tmp_path / "tok"), "--out", str(tmp_path / "mixed"),
              "--weights", "books=0.5,lib-a=0.5,pg19=0,arxiv=0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: megatron-lc data mix ")
    assert "--weights" in err and "'pg19'" in err and "'arxiv'" in err  # both unknown sources at once
    with pytest.raises(SystemExit):
        main(["data", "mix", str(tmp_path / "tok"), "--out", str(tmp_path / "mixed"),
              "--weights", "books=0.5,lib-a=0.5"])
    err = capsys.readouterr().err
    assert all(f"'{n}'" in err for n in ("lib-b", "lib-c", "scrolls")), err  # every missing source
    for argv, flag in ((["--long-share", "1.5"], "--long-share"), (["--long-threshold", "0"], "--long-threshold"),
                       (["--strategy", "upsample_domains"], "--domains"),
                       (["--strategy", "global_upsample", "--long-threshold", "100000"], "--long-threshold")):
        with pytest.raises(SystemExit):
            main(["data", "mix", str(tmp_path / "tok"), "--out", str(tmp_path / "mixed"), *argv])
        err = capsys.readouterr().err
        assert err.startswith("usage: megatron-lc data mix ") and flag in err, (argv, err)
        for internal in ("target_weights", "long_threshold", "long_share", "downsample_long", "cut_length"):
            assert internal not in err.split("\n", 2)[-1], (argv, err)  # the message, past the usage lines
    assert not (tmp_path / "mixed.idx").exists()


# ---- (4) dedup and cleaning per source kind, on the standard library ------------------------------------------
N_FILES = 60


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """The first N_FILES standard-library files (one record each, with path and an extra field) and the
    docstrings of the library as prose; returns (folder, code records by path)."""
    folder = tmp_path_factory.mktemp("stdlib")
    root = stdlib_root()
    code = {}
    for path in stdlib_files()[:N_FILES]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if text.strip():
            code[rel] = {"text": text, "source": "lib-" + rel.split("/")[0].removesuffix(".py"), "path": rel,
                         "license": "PSF"}
    prose = [{"text": d, "source": "docs", "id": i} for i, d in enumerate(stdlib_docstrings(120_000))]
    write_jsonl(folder / "code.jsonl", list(code.values()))
    write_jsonl(folder / "docs.jsonl", prose)
    return folder, code


def test_code_files_keep_every_line_prose_is_deduplicated_and_fields_are_kept(stdlib_corpus, tmp_path):
    folder, code = stdlib_corpus
    report = pipeline.clean_corpus([str(folder)], str(tmp_path / "out"), workers=0, progress=False)
    out = read_jsonl(tmp_path / "out" / "deduped.jsonl")
    kept_code = [r for r in out if r["source"] != "docs"]
    exact_dupes = len(code) - len({r["text"] for r in code.values()})
    assert len(kept_code) == len(code) - exact_dupes  # the prose rules no longer drop code files
    for r in kept_code:
        assert r["text"] == code[r["path"]]["text"], f"{r['path']}: a line was deleted"
        assert r["license"] == "PSF"
    docs = [r for r in out if r["source"] == "docs"]
    assert docs and all(isinstance(r["id"], int) for r in docs)  # extra fields of prose records too
    rows = report["per_source"]
    assert rows["docs"]["prose"] > 0 and rows["docs"]["changed"]["paragraph"] > 0  # prose still deduplicated
    assert report["dedup"]["paragraphs_removed"] > 0
    for name, row in rows.items():
        assert row["documents_in"] == row["documents_out"] + sum(row["removed"].values()), name
        if name != "docs":
            assert row["code"] == row["documents_in"] and row["changed"] == {"paragraph": 0, "sentence": 0}
    cleaned = read_jsonl(tmp_path / "out" / "cleaned.jsonl")
    assert all("path" in r for r in cleaned if r["source"] != "docs")  # the intermediate file keeps them too


def test_kind_is_guessed_from_lines_without_a_path_and_flags_override_it(stdlib_corpus, tmp_path, capsys):
    folder, code = stdlib_corpus
    records = [{"text": r["text"], "source": "lib"} for r in code.values()]  # no path: line statistics decide
    write_jsonl(tmp_path / "nopath.jsonl", records + read_jsonl(folder / "docs.jsonl"))
    report = pipeline.clean_corpus([str(tmp_path / "nopath.jsonl")], str(tmp_path / "a"), workers=0,
                                   progress=False)
    lib = report["per_source"]["lib"]
    assert lib["code"] >= 0.9 * lib["documents_in"]  # tiny docstring-only modules may read as prose
    # docstrings are prose, apart from those made mostly of examples (>>> lines, indented code)
    assert report["per_source"]["docs"]["prose"] >= 0.7 * report["per_source"]["docs"]["documents_in"]
    # --prose-sources lib: the stdlib files get paragraph dedup and the prose rules again (the old behaviour)
    assert main(["data", "clean", str(tmp_path / "nopath.jsonl"), "--out", str(tmp_path / "b"), "--workers", "0",
                 "--prose-sources", "lib", "--code-sources", "docs"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "b" / "clean_report.json").read_text())["per_source"]
    assert rows["lib"]["prose"] == rows["lib"]["documents_in"] and rows["docs"]["code"] == rows["docs"]["documents_in"]
    assert sum(rows["lib"]["removed"].values()) > 0.2 * rows["lib"]["documents_in"]  # prose rules drop code
    assert rows["docs"]["changed"]["paragraph"] == 0
    assert "source" in out and "removed" in out and "lib" in out  # the per-source table is printed
    # --source-types YAML and --no-paragraph
    (tmp_path / "types.yaml").write_text("lib: prose\ndocs: prose\nghost: code\n")
    assert main(["data", "clean", str(tmp_path / "nopath.jsonl"), "--out", str(tmp_path / "c"), "--workers", "0",
                 "--source-types", str(tmp_path / "types.yaml"), "--no-paragraph", "--no-sentence"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "c" / "clean_report.json").read_text())
    assert report["per_source"]["lib"]["prose"] == len(records)
    assert report["dedup"]["paragraphs_in"] == 0 and report["source_types_unused"] == ["ghost"]
    assert "'ghost'" in out


def test_source_kind_errors_name_the_flags_and_every_source(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "One line of text here.", "source": "a"}])
    (tmp_path / "types.yaml").write_text("a: code\nb: prose\nc: markdown\nd: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"),
              "--source-types", str(tmp_path / "types.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: megatron-lc data clean ")
    assert "--source-types" in err and "'c'" in err and "'d'" in err
    with pytest.raises(ConfigError, match=r"a \(code by --code-sources, prose by --prose-sources\); b \(") as e:
        SourceKinds.from_flags("a,b", "a,b")
    assert not (tmp_path / "o").exists()


def test_code_rules_file_turns_a_rule_on_for_code(tmp_path):
    lines = "\n".join(f"x{i} = {i}" for i in range(40))  # code of short lines: the prose rules would drop it
    write_jsonl(tmp_path / "in.jsonl", [{"text": lines, "source": "gen", "path": "gen.py"}])
    assert CleaningRules.code().max_short_paragraph_ratio is None
    (tmp_path / "code.yaml").write_text("max_short_paragraph_ratio: 0.5\n")
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "a"), "--workers", "0"]) == 0
    assert len(read_jsonl(tmp_path / "a" / "deduped.jsonl")) == 1
    assert main(["data", "clean", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "b"), "--workers", "0",
                 "--code-rules", str(tmp_path / "code.yaml")]) == 0
    report = json.loads((tmp_path / "b" / "clean_report.json").read_text())
    assert report["per_source"]["gen"]["removed"] == {"short_paragraphs": 1}


def test_guess_kind_reads_the_extension_first():
    assert guess_kind("Plain words in a sentence.", "src/a.py") == "code"
    assert guess_kind("def f(x):\n    return x\n", "README.md") == "prose"
    assert guess_kind("def f(x):\n    return x\n") == "code"
    assert guess_kind("From the hills, with care:\nwe walked home.") == "prose"


def test_parquet_extra_columns_travel_with_the_document(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a text"], "domain": ["web"], "url": ["http://x"]}), tmp_path / "p.parquet")
    (doc,) = iter_documents([str(tmp_path / "p.parquet")], text_key="content", source_key="domain")
    assert doc.extra == {"url": "http://x"}


# ---- (7b) data tokenize --val-fraction ----------------------------------------------------------------------------
def _docs_file(path, n):
    write_jsonl(path, [{"text": f"document number {i} " * 3, "source": "web" if i % 2 else "books"}
                       for i in range(n)])


def _texts(prefix):
    ds = IndexedDataset(prefix)
    return {bytes(ds.get(i)[:-1].astype(np.uint8)).decode() for i in range(len(ds))}


def test_tokenize_val_fraction_splits_by_document(tmp_path, capsys):
    _docs_file(tmp_path / "in.jsonl", 200)
    out = str(tmp_path / "tokens")
    argv = ["data", "tokenize", str(tmp_path / "in.jsonl"), "--tokenizer", "bytes", "--out", out, "--workers", "0",
            "--val-fraction", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train, val = IndexedDataset(out), IndexedDataset(out + "_val")
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert f"train: {out} ({len(train):,} documents, {train.num_tokens:,} tokens)" in printed
    assert f"val: {out}_val ({len(val):,} documents, {val.num_tokens:,} tokens)" in printed
    first = (_texts(out), _texts(out + "_val"))
    assert not first[0] & first[1] and len(first[0] | first[1]) == 200  # by document, nothing lost or shared
    assert val.meta["split"]["part"] == "val" and train.meta["documents"] == len(train)
    assert set(val.source_names) == {"books", "web"}
    assert main(argv) == 0  # deterministic
    assert (_texts(out), _texts(out + "_val")) == first
    assert main(argv + ["--seed", "1"]) == 0  # seeded
    assert _texts(out + "_val") != first[1]


@pytest.mark.parametrize("fraction,docs,match", [("1.0", 50, "strictly between 0 and 1"),
                                                  ("0", 50, "strictly between 0 and 1"),
                                                  ("-0.2", 50, "strictly between 0 and 1"),
                                                  ("0.001", 3, "validation set, leaving the validation set empty"),
                                                  ("0.999", 3, "leaving the training set empty")])
def test_tokenize_refuses_bad_fractions_and_empty_sides(tmp_path, capsys, fraction, docs, match):
    _docs_file(tmp_path / "in.jsonl", docs)
    with pytest.raises(SystemExit) as e:
        main(["data", "tokenize", str(tmp_path / "in.jsonl"), "--tokenizer", "bytes", "--out",
              str(tmp_path / "tokens"), "--workers", "0", "--val-fraction", fraction])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--val-fraction" in err and match in err, err
    assert "\nusage: megatron-lc data tokenize " in "\n" + err  # after the progress bar, if any
    assert not list(tmp_path.glob("tokens*"))  # neither dataset is written


# ---- (9) the mixture plot's legend ------------------------------------------------------------------------------
def test_mixture_legend_names_top_nine_groups_the_rest_and_colours_differ(tmp_path):
    rng = np.random.default_rng(0)
    lengths, sources = [], []
    for k in range(14):  # source s13 has the most tokens, s0 the fewest
        n = 20 + 10 * k
        lengths.append(np.maximum(rng.lognormal(np.log(500 + 100 * k), 0.8, n), 1).astype(np.int64))
        sources += [f"s{k}"] * n
    lengths, sources = np.concatenate(lengths), np.array(sources)
    path = tmp_path / "mix.png"
    fig = plot_lengths(lengths, sources, plan_mixture(lengths, sources, "original"), path,
                       bins=20, figsize=(6, 3), dpi=40)
    assert path.stat().st_size > 0
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [f"s{k}" for k in range(13, 4, -1)] + ["other"]
    colours = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    assert len(set(colours)) == len(colours) == 10
    from matplotlib import colormaps

    tab10 = {tuple(c) for c in colormaps["tab10"].colors}  # clearly different hues, not tab20's light/dark pairs
    assert {c[:3] for c in colours} <= tab10 and colours[-1][:3] == colormaps["tab10"].colors[7]  # other: grey
    # with few sources every one is named and there is no "other"
    few = np.isin(sources, ["s1", "s2", "s3"])
    fig = plot_lengths(lengths[few], sources[few], plan_mixture(lengths[few], sources[few], "original"), path,
                       bins=20, dpi=40)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["s3", "s2", "s1"]
