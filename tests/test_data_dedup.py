"""Dedup: exact and MinHash-LSH near-duplicate documents, 30% paragraph dedup, sqrt(N) sentence dedup, the report."""
import math
import random
import string

import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.data.dedup import (
    DedupConfig,
    ExactDedup,
    NearDedup,
    ParagraphDedup,
    SentenceDedup,
    dedup_corpus,
    dedup_paragraphs,
    dedup_sentences,
    jaccard,
    round_half_up,
    shingles,
)


def make_vocab(rng, size=5000):
    return sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(size)})


def random_words(rng, vocab, n):
    return [rng.choice(vocab) for _ in range(n)]


def edit_words(rng, vocab, words, n_edits):
    """Copy of ``words`` with ``n_edits`` words at random positions replaced by other random words."""
    out = list(words)
    for pos in rng.sample(range(len(out)), n_edits):
        out[pos] = rng.choice([w for w in rng.sample(vocab, 5) if w != out[pos]])
    return out


def sentence(rng, vocab, n=20):
    words = random_words(rng, vocab, n)
    return " ".join(words).capitalize() + "."


# ----------------------------------------------------------------------------------------------- exact
def test_exact_dedup_normalizes_whitespace_and_width_and_keeps_first():
    docs = ["Hello  world.\nSecond line.", "Hello world. Second line.", "ＨＥＬＬＯ world.", "HELLO world.",
            "hello world."]
    exact = ExactDedup()
    kept = list(exact.filter(docs))
    # Whitespace runs and NFKC full-width letters normalize away; case does not.
    assert kept == ["Hello  world.\nSecond line.", "ＨＥＬＬＯ world.", "hello world."]
    assert (exact.documents, exact.removed) == (5, 2)


# ----------------------------------------------------------------------------------------------- near
def test_near_dedup_finds_planted_near_duplicates_and_keeps_distinct_documents():
    rng = random.Random(0)
    vocab = make_vocab(rng)
    bases = [random_words(rng, vocab, 300) for _ in range(30)]
    distinct = [random_words(rng, vocab, 300) for _ in range(60)]
    near = [edit_words(rng, vocab, b, 3) for b in bases]                 # a few words edited
    loose = [edit_words(rng, vocab, b, 30) for b in bases[:10]]          # 10% of words edited: not a near duplicate

    sh = lambda words: shingles(" ".join(words), 5)
    near_j = [jaccard(sh(b), sh(n)) for b, n in zip(bases, near)]
    assert min(near_j) >= 0.9, min(near_j)
    loose_j = [jaccard(sh(b), sh(x)) for b, x in zip(bases, loose)]
    assert max(loose_j) < 0.6, max(loose_j)
    originals = bases + distinct
    other_j = max(jaccard(sh(a), sh(b)) for i, a in enumerate(originals) for b in originals[i + 1:])
    assert other_j < 0.05, other_j

    first = [" ".join(w) for w in originals]
    rng.shuffle(first)
    later = [" ".join(w) for w in near + loose]
    rng.shuffle(later)
    dedup = NearDedup(threshold=0.8, num_perm=128, ngram=5, seed=1)
    kept = list(dedup.filter(first + later))
    assert kept == first + sorted((" ".join(w) for w in loose), key=later.index)
    assert (dedup.documents, dedup.removed) == (130, 30)
    # Deterministic: a fresh object with the same seed makes the same decisions.
    assert list(NearDedup(seed=1).filter(first + later)) == kept


def test_near_dedup_rejects_bad_settings():
    with pytest.raises(ConfigError, match="threshold"):
        NearDedup(threshold=1.5)


# ----------------------------------------------------------------------------------------------- paragraphs
def paragraph_corpus(sizes, n_docs):
    """Docs where paragraph P<N> occurs in exactly N docs, each doc also holding one unique paragraph."""
    docs = []
    for i in range(n_docs):
        lines = [f"Unique opening paragraph of document number {i}, about nothing in particular."]
        lines += [f"Repeated paragraph of group {n}, a template line that appears on many pages." for n in sizes if i < n]
        docs.append("\n".join(lines))
    return docs


def group_counts(texts, sizes):
    lines = [line for t in texts for line in t.split("\n")]
    return {n: lines.count(f"Repeated paragraph of group {n}, a template line that appears on many pages.")
            for n in sizes}


def test_paragraph_dedup_deletes_thirty_percent_of_each_group():
    sizes = (1, 2, 5, 10, 100)
    docs = paragraph_corpus(sizes, 100)
    assert group_counts(docs, sizes) == {n: n for n in sizes}
    stage = ParagraphDedup(fraction=0.3, seed=0)
    for d in docs:
        stage.count(d)
    out = [stage.rewrite(d) for d in docs]
    # kept = N - round_half_up(0.3 N): 1->1, 2->1, 5->3 (1.5 rounds up), 10->7, 100->70
    assert group_counts(out, sizes) == {1: 1, 2: 1, 5: 3, 10: 7, 100: 70}
    assert all(o.startswith(f"Unique opening paragraph of document number {i},") for i, o in enumerate(out))
    assert stage.units == 100 + sum(sizes) and stage.removed == 0 + 1 + 2 + 3 + 30
    assert [round_half_up(x) for x in (0.3, 0.6, 1.5, 3.0, 4.5)] == [0, 1, 2, 3, 5]


def test_paragraph_dedup_is_seeded_and_needs_two_passes():
    docs = paragraph_corpus((100,), 100)
    a, b, c = dedup_paragraphs(docs, seed=0), dedup_paragraphs(docs, seed=0), dedup_paragraphs(docs, seed=1)
    assert a == b and a != c
    assert group_counts(c, (100,)) == {100: 70}
    with pytest.raises(ConfigError, match="re-iterable"):
        dedup_paragraphs(iter(docs))
    stage = ParagraphDedup()
    stage.count(docs[0])
    stage.rewrite(docs[0])
    with pytest.raises(ConfigError, match="more often"):
        stage.rewrite(docs[0])


# ----------------------------------------------------------------------------------------------- sentences
def test_sentence_dedup_keeps_sqrt_n_copies():
    rng = random.Random(1)
    vocab = make_vocab(rng, 3000)
    sizes = (1, 2, 4, 5, 9, 100)
    repeated = {n: sentence(rng, vocab) for n in sizes}
    docs, fillers = [], []
    for i in range(100):
        filler = sentence(rng, vocab)
        fillers.append(filler)
        docs.append(" ".join([filler] + [repeated[n] for n in sizes if i < n]))
    out = dedup_sentences(docs, min_tokens=16, seed=0)
    kept = {n: sum(o.count(repeated[n]) for o in out) for n in sizes}
    # ceil(sqrt(N)): 1->1, 2->2, 4->2, 5->3, 9->3, 100->10
    assert kept == {n: math.ceil(math.sqrt(n)) for n in sizes} == {1: 1, 2: 2, 4: 2, 5: 3, 9: 3, 100: 10}
    assert all(f in o for f, o in zip(fillers, out))


def test_short_sentences_are_protected_by_16_token_concatenation():
    rng = random.Random(2)
    vocab = make_vocab(rng, 3000)
    short = "Thank you for reading."
    docs = [short + " " + sentence(rng, vocab) for _ in range(50)]
    # With 16-token units the short sentence is keyed together with its (unique) successor: nothing removed.
    assert sum(d.startswith(short) for d in dedup_sentences(docs, min_tokens=16)) == 50
    # Without concatenation every sentence is its own unit and keeps ceil(sqrt(50)) = 8 copies.
    assert sum(d.startswith(short) for d in dedup_sentences(docs, min_tokens=1)) == 8
    # The same short sentence with the same successor is one repeated 16+-token unit: deduplicated.
    same = short + " " + sentence(rng, vocab)
    assert sum(d == same for d in dedup_sentences([same] * 50, min_tokens=16)) == 8


def test_sentence_dedup_keeps_paragraph_breaks_and_tail():
    rng = random.Random(3)
    vocab = make_vocab(rng, 3000)
    dup, a, b = sentence(rng, vocab), sentence(rng, vocab), sentence(rng, vocab)
    docs = [f"{a}\n{dup}\n{b}\nShort tail.", f"{dup}\n{b}"]
    stage = SentenceDedup(min_tokens=16, seed=0)
    for d in docs:
        stage.count(d)
    out = [stage.rewrite(d) for d in docs]
    assert stage.keep(2) == 2 and out == docs      # 2 copies keep ceil(sqrt 2) = 2
    one_kept = dedup_sentences([f"{a}\n{dup}\n{b}"] + [dup] * 3, seed=0)
    assert sum(o.count(dup) for o in one_kept) == 2 and all("\n\n" not in o for o in one_kept)


# ----------------------------------------------------------------------------------------------- whole corpus
def test_dedup_corpus_report_adds_up():
    rng = random.Random(4)
    vocab = make_vocab(rng, 3000)
    base = [" ".join(random_words(rng, vocab, 200)) + "." for _ in range(20)]
    docs = list(base)
    docs += [base[0], base[1] + "  ", base[2].replace(" ", "\n", 3)]                     # 3 exact duplicates
    docs += [" ".join(edit_words(rng, vocab, base[i][:-1].split(), 2)) + "." for i in range(3, 7)]  # 4 near
    template = "Click here to subscribe to our newsletter and never miss an update from us."
    docs += [template] * 10                                                              # 9 exact dups of it
    docs += [template + "\n" + base[i][:100] + " unique " + str(i) + "." for i in range(7, 17)]
    texts, report = dedup_corpus(docs, DedupConfig())
    assert report.documents_in == len(docs) == 47
    assert report.exact_removed == 3 + 9
    assert report.near_removed == 4
    assert report.consistent(), report.format()
    assert report.documents_out == len(texts)
    # The template paragraph appears 11 times after document dedup: round_half_up(3.3) = 3 occurrences deleted.
    assert report.paragraphs_removed == 3
    # The template sentence has 14 tokens, so sentence dedup only sees it inside longer units: none removed.
    assert report.sentence_units_removed == 0
    assert sum(t.count(template) for t in texts) == 8
    assert report.documents_out == 31 - report.paragraph_emptied
    assert set(report.as_dict()) >= {"documents_in", "exact_removed", "near_removed", "paragraph_emptied",
                                     "sentence_emptied", "documents_out"}
