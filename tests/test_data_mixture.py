"""Data mixtures (Fu et al. 2024): per-source vs global length upsampling, cut-at-L, original, chosen domains."""
import time

import numpy as np
import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.data.mixture import (
    STRATEGIES,
    _choose_counts,
    format_report,
    mixture_stats,
    plan_mixture,
    plot_lengths,
)

# name: (documents, median length, lognormal sigma). Token-weighted long (>4K) shares come out near
# cc 25%, c4 10%, github 47%, wiki 20%, books 86%, arxiv 53%, stackexchange 5% (corpus ~33%, as in SlimPajama).
DOMAINS = {
    "cc": (14200, 768, 1.0), "c4": (5600, 775, 0.8), "github": (2670, 641, 1.3), "wiki": (3000, 649, 1.0),
    "books": (700, 4948, 0.8), "arxiv": (690, 2740, 0.7), "stackexchange": (1580, 794, 0.7),
}
SLIMPAJAMA = {"cc": 0.67, "c4": 0.15, "github": 0.045, "wiki": 0.045, "books": 0.045, "arxiv": 0.025,
              "stackexchange": 0.02}


def make_corpus(seed=1, domains=DOMAINS):
    rng = np.random.default_rng(seed)
    lengths, sources = [], []
    for name, (n, median, sigma) in domains.items():
        lengths.append(np.maximum(rng.lognormal(np.log(median), sigma, n), 1).astype(np.int64))
        sources += [name] * n
    return np.concatenate(lengths), np.array(sources)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


def test_synthetic_corpus_has_the_intended_profile(corpus):
    # guards the premise of the tests below: long shares below 70% except books, overall ~1/3
    st = mixture_stats(*corpus)
    assert 0.25 < st["total"]["long_share"] < 0.40
    assert st["sources"]["books"]["long_share"] > 0.8
    assert st["sources"]["c4"]["long_share"] < 0.15 and st["sources"]["stackexchange"]["long_share"] < 0.1


@pytest.mark.parametrize("weights,total", [(None, None), (SLIMPAJAMA, 20_000_000)])
def test_per_source_keeps_domain_shares_and_hits_long_share(corpus, weights, total):
    lengths, sources = corpus
    before = mixture_stats(lengths, sources)
    plan = plan_mixture(lengths, sources, "per_source_upsample", target_weights=weights, total_tokens=total)
    after = mixture_stats(lengths, sources, plan)
    target = weights or {n: r["token_share"] for n, r in before["sources"].items()}
    want_total = total or before["total"]["tokens"]
    assert abs(after["total"]["tokens"] - want_total) <= 1e-3 * want_total  # budget met within 0.1%
    for name, row in after["sources"].items():
        assert abs(row["token_share"] - target[name]) <= 0.01, (name, row)  # must-hold: 1 point
        assert abs(row["long_share"] - 0.7) <= 0.03, (name, row)  # must-hold: 3 points
    # it really had to change the lengths: c4 started near 10% long
    assert before["sources"]["c4"]["long_share"] < 0.15
    assert plan.counts.max() > 1 and (plan.counts == 0).any()  # long docs repeated, short docs subsampled


def test_per_source_without_downsampling_keeps_books_profile(corpus):
    lengths, sources = corpus
    before = mixture_stats(lengths, sources)
    after = mixture_stats(lengths, sources, plan_mixture(lengths, sources, downsample_long=False))
    books = before["sources"]["books"]["long_share"]
    assert abs(after["sources"]["books"]["long_share"] - books) <= 0.03  # above 70% already: left as it was
    assert abs(after["sources"]["wiki"]["long_share"] - 0.7) <= 0.03
    for name, row in after["sources"].items():
        assert abs(row["token_share"] - before["sources"][name]["token_share"]) <= 0.01


def _report_delta(report: str, name: str) -> float:
    row = next(line for line in report.splitlines() if line.split("|")[0].strip() == name)
    return float(row.split("|")[3].strip().removesuffix("pt"))


def test_global_upsample_shifts_domain_shares_and_report_shows_it(corpus):
    lengths, sources = corpus
    before = mixture_stats(lengths, sources)
    plan = plan_mixture(lengths, sources, "global_upsample")
    after = mixture_stats(lengths, sources, plan)
    assert abs(after["total"]["long_share"] - 0.7) <= 0.01
    moves = {n: after["sources"][n]["token_share"] - before["sources"][n]["token_share"] for n in before["sources"]}
    assert moves["books"] > 0.05, moves  # the long domain gains more than 5 points
    assert max(abs(m) for m in moves.values()) > 0.05
    report = format_report(before, after)
    assert _report_delta(report, "books") > 5.0, report
    assert abs(_report_delta(report, "books") - 100 * moves["books"]) < 0.01
    # per-source upsampling, same corpus, same long share: no domain moves by 1 point in the report
    per_source = format_report(before, mixture_stats(lengths, sources, plan_mixture(lengths, sources)))
    assert all(abs(_report_delta(per_source, n)) < 1.0 for n in before["sources"]), per_source


def test_upsample_domains_touches_only_chosen(corpus):
    lengths, sources = corpus
    before = mixture_stats(lengths, sources)
    plan = plan_mixture(lengths, sources, "upsample_domains", upsample_domains=("books", "arxiv"))
    after = mixture_stats(lengths, sources, plan)
    chosen = np.isin(sources, ["books", "arxiv"])
    assert (plan.counts[~chosen] == 1).all()  # others unchanged
    assert (plan.counts[chosen & (lengths <= 4096)] == 1).all()  # short docs of chosen domains unchanged
    assert plan.counts[chosen & (lengths > 4096)].max() > 1
    assert abs(after["total"]["long_share"] - 0.7) <= 0.01
    assert after["sources"]["books"]["token_share"] > before["sources"]["books"]["token_share"] + 0.05
    # with a token budget the whole mixture is rescaled to it
    plan2 = plan_mixture(lengths, sources, "upsample_domains", upsample_domains=["books"], total_tokens=10_000_000)
    assert abs(mixture_stats(lengths, sources, plan2)["total"]["tokens"] - 10_000_000) <= 10_000


def test_original_is_identity(corpus):
    lengths, sources = corpus
    plan = plan_mixture(lengths, sources, "original")
    assert plan.cut_length is None and (plan.counts == 1).all()
    assert mixture_stats(lengths, sources, plan) == mixture_stats(lengths, sources)


def test_cut_pieces_are_short_and_tokens_kept(corpus):
    lengths, sources = corpus
    plan = plan_mixture(lengths, sources, "cut")
    assert plan.cut_length == 4096 and (plan.counts == 1).all()
    before, after = mixture_stats(lengths, sources), mixture_stats(lengths, sources, plan)
    assert after["total"]["tokens"] == before["total"]["tokens"]
    assert after["total"]["long_tokens"] == 0  # no piece longer than 4096
    expected_pieces = int((lengths // 4096).sum() + (lengths % 4096 > 0).sum())
    assert after["total"]["documents"] == expected_pieces
    for name in before["sources"]:
        assert after["sources"][name]["tokens"] == before["sources"][name]["tokens"]
    # exact piece accounting: 10000 at 4096 -> 4096, 4096, 1808; with threshold 4000 the two full pieces are long
    tiny = mixture_stats([10000, 4096, 5], ["a", "a", "b"], plan_mixture([10000, 4096, 5], ["a", "a", "b"], "cut",
                                                                         cut_length=4096, long_threshold=4000))
    assert tiny["sources"]["a"] == {"tokens": 14096, "token_share": 14096 / 14101, "long_tokens": 3 * 4096,
                                    "long_share": 3 * 4096 / 14096, "documents": 4, "max_repeat": 1}


def test_deterministic_given_seed(corpus):
    lengths, sources = corpus
    for strategy in ("per_source_upsample", "global_upsample"):
        a = plan_mixture(lengths, sources, strategy, seed=3)
        b = plan_mixture(lengths, sources, strategy, seed=3)
        c = plan_mixture(lengths, sources, strategy, seed=4)
        assert np.array_equal(a.counts, b.counts)
        assert not np.array_equal(a.counts, c.counts)
    # sources given as a list or an array give the same plan
    assert np.array_equal(plan_mixture(lengths, list(sources)).counts, plan_mixture(lengths, sources).counts)


def test_document_indices_expand_counts(corpus):
    lengths, sources = corpus
    plan = plan_mixture(lengths, sources)
    idx = plan.document_indices()
    assert idx.dtype == np.int64 and idx.size == plan.counts.sum()
    assert np.array_equal(np.bincount(idx, minlength=lengths.size), plan.counts)
    assert np.array_equal(idx, plan.document_indices())  # seeded shuffle
    assert np.all(np.diff(plan.document_indices(shuffle=False)) >= 0)
    assert plan.to_dict()["documents_emitted"] == idx.size


def test_choose_counts_hits_target_tightly():
    rng = np.random.default_rng(0)
    lens = rng.integers(100, 5000, 2000)
    for target in (1, 12345, int(lens.sum() // 3), int(lens.sum()), int(2.5 * lens.sum())):
        c = _choose_counts(lens, target, np.random.default_rng(1))
        got = int((c * lens).sum())
        assert abs(got - target) <= 50, (target, got)  # many sizes to swap in: the gap closes to < 50 tokens
    assert (_choose_counts(lens, int(lens.sum()), rng) == 1).all()
    assert (_choose_counts(lens, 0, rng) == 0).all()


def test_plot_writes_png(corpus, tmp_path):
    import matplotlib.image as mpimg

    lengths, sources = corpus
    path = tmp_path / "lengths.png"
    plot_lengths(lengths, sources, plan_mixture(lengths, sources), path, figsize=(10, 4), dpi=50)
    img = mpimg.imread(path)
    assert img.shape[:2] == (200, 500)
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "books_only"}, "strategy"),
    ({"long_share": 1.0}, "--long-share"),
    ({"long_share": -0.1}, "--long-share"),
    ({"target_weights": {**SLIMPAJAMA, "code": 0.0}}, "code"),
    ({"target_weights": {k: v for k, v in SLIMPAJAMA.items() if k != "wiki"}}, "wiki"),
    ({"target_weights": {**SLIMPAJAMA, "cc": 0.5}}, "sum to"),
    ({"target_weights": {**SLIMPAJAMA, "cc": 0.695, "c4": -0.025}}, "c4"),
    ({"strategy": "upsample_domains", "upsample_domains": ("books", "pg19")}, "pg19"),
    ({"strategy": "upsample_domains"}, "--domains"),
    ({"upsample_domains": ("books",)}, "--domains"),
    ({"strategy": "cut", "cut_length": 0}, "--cut-length"),
    ({"total_tokens": 0}, "--total-tokens"),
    ({"long_threshold": 0}, "--long-threshold"),
    ({"seed": -1}, "--seed"),
])
def test_bad_config_raises(corpus, kwargs, match):
    lengths, sources = corpus
    with pytest.raises(ConfigError, match=match):
        plan_mixture(lengths, sources, **kwargs)


def test_sources_without_long_or_short_documents_keep_their_profile():
    # "notes" has no long documents: it keeps its own (all-short) profile and its budget; the run goes on
    lengths, sources = make_corpus(domains={"cc": (3000, 768, 1.0), "notes": (500, 200, 0.3)})
    plan = plan_mixture(lengths, sources)
    assert plan.own_profile == ("notes",) and plan.to_dict()["own_profile"] == ["notes"]
    before, after = mixture_stats(lengths, sources), mixture_stats(lengths, sources, plan)
    assert after["sources"]["notes"]["long_share"] == 0.0
    assert abs(after["sources"]["notes"]["token_share"] - before["sources"]["notes"]["token_share"]) <= 0.01
    assert abs(after["sources"]["cc"]["long_share"] - 0.7) <= 0.03
    w = {"cc": 1.0, "notes": 0.0}
    dropped = plan_mixture(lengths, sources, target_weights=w)
    assert (dropped.counts[sources == "notes"] == 0).all() and dropped.own_profile == ()
    # "scrolls" has only long documents: it keeps its all-long profile (with or without --keep-long-sources)
    lengths, sources = make_corpus(domains={"cc": (3000, 768, 1.0), "scrolls": (200, 50000, 0.2)})
    for downsample in (True, False):
        plan = plan_mixture(lengths, sources, downsample_long=downsample)
        after = mixture_stats(lengths, sources, plan)
        assert after["sources"]["scrolls"]["long_share"] == 1.0
        assert abs(after["sources"]["cc"]["long_share"] - 0.7) <= 0.03
    assert plan_mixture(lengths, sources).own_profile == ("scrolls",)


@pytest.mark.parametrize("lengths,sources,match", [
    ([5, -1], ["a", "a"], "negative"),
    ([5, 6], ["a"], "one source per"),
    ([], [], "non-empty"),
    ([1.5, 2.0], ["a", "a"], "integers"),
])
def test_bad_corpus_raises(lengths, sources, match):
    with pytest.raises(ConfigError, match=match):
        plan_mixture(np.asarray(lengths), sources)


def test_every_strategy_runs_on_a_million_documents_in_seconds():
    rng = np.random.default_rng(0)
    n = 1_000_000
    lengths = np.maximum(rng.lognormal(7.0, 1.1, n), 1).astype(np.int64)
    sources = np.array(list(DOMAINS))[rng.integers(0, len(DOMAINS), n)]
    for strategy in STRATEGIES:
        kw = {"upsample_domains": ("books",)} if strategy == "upsample_domains" else {}
        t0 = time.perf_counter()
        plan = plan_mixture(lengths, sources, strategy, **kw)
        elapsed = time.perf_counter() - t0
        assert plan.counts.shape == (n,)
        assert elapsed < 10.0, (strategy, elapsed)  # ~1 s on one free core; generous for shared machines
