"""Long-context data mixtures (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context").

The pipeline calls :func:`plan_mixture` once every document's token count and source are known. The plan says how
many times each document is emitted (0 dropped, 1 once, k repeated) and, for cut-at-L, the piece length. Strategies:

- ``original``: every document once at full length ("cut at 128K" in the paper: the natural mixture, long documents
  kept whole).
- ``cut``: every document once, cut into pieces of at most ``cut_length`` tokens (default ``long_threshold``, i.e.
  "cut at 4K": no long piece is left).
- ``global_upsample``: raise the long-token share of the whole corpus to ``long_share`` regardless of source; every
  long document gets the same expected repeat factor and every short one the same keep probability, so sources with
  many long documents (books, code) gain share.
- ``per_source_upsample`` (default, the paper's recommendation): every source keeps its token budget
  (``target_weights[s] * total_tokens``) and, inside it, the tokens of long documents make up ``long_share``.
- ``upsample_domains``: upsample long documents of the chosen domains only (e.g. books, arxiv) until the whole
  corpus reaches ``long_share``; every other document is emitted once. Changes both domain and length mixtures.

How targets are hit. Every strategy first fixes a token target for each (source, short/long) group, then
:func:`_choose_counts` meets it with whole documents: every document of the group is repeated ``target // group``
times and the remainder is filled with documents in a seeded random order (a uniform sample of documents, i.e.
"keep each short document with probability p"), after which a few single-document swaps close the gap to less than
the shortest useful document. Long documents of a source that has too few long tokens are thus repeated, and short
documents are subsampled. For per_source the short target of a source is set after its long documents are chosen,
so the source's budget is met to within a few tokens; the other strategies fill each group on its own, so a group
whose target is its natural size keeps every document exactly once.

``total_tokens`` defaults to the corpus' own token count, except for ``upsample_domains``, where by default the
other documents stay exactly as they are and the mixture grows by the upsampled tokens.

A source whose natural long share is already above ``long_share`` (books) is brought down to it by default, so every
source ends with the same length profile (its short documents may then be repeated); ``downsample_long=False``
keeps such a source's natural profile instead (upsampling then only ever raises long shares).

A source that cannot take the target profile at all under per_source_upsample, because it has no document above
``long_threshold`` (most sources of a code or notes corpus) or only such documents, keeps its own length profile
and its token budget; the plan lists it in ``own_profile`` and the run goes on (the corpus' long share then ends
below the target, as the report shows).

Errors name the ``megatron-lc data mix`` flags (``--long-share``, ``--long-threshold``, ``--weights``, ...) that
set each parameter, and list every offending source at once.

A document is "long" when it has more than ``long_threshold`` tokens (the paper's "longer than 4K").
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from megatron_lc.configtools import ConfigError

STRATEGIES = ("original", "cut", "global_upsample", "per_source_upsample", "upsample_domains")
_WEIGHT_SUM_TOL = 1e-3
_FIXUP_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class MixturePlan:
    """How often each document is emitted and how documents are cut, plus the parameters that produced it."""

    strategy: str
    counts: np.ndarray  # int64 [N]: times each document is emitted (0 dropped, 1 once, k repeated)
    cut_length: int | None  # documents are cut into pieces of at most this many tokens; None: kept whole
    long_threshold: int  # a document (or piece) is long when it has more than this many tokens
    long_share: float  # target share of tokens from long documents
    target_weights: dict[str, float]  # resolved per-source token weights (sum 1) the plan was built from
    total_tokens: int  # token target the plan was built for (cutting keeps tokens)
    upsample_domains: tuple[str, ...]
    seed: int
    own_profile: tuple[str, ...] = ()  # per_source: sources that kept their own profile (no long or no short docs)

    def document_indices(self, shuffle: bool = True) -> np.ndarray:
        """int64 [counts.sum()]: document ids in emission order, each repeated ``counts[i]`` times.

        With ``shuffle`` the order is a seeded permutation, so repeats of one document are spread over the stream
        instead of sitting next to each other in one packed sequence.
        """
        idx = np.repeat(np.arange(self.counts.size, dtype=np.int64), self.counts)
        if shuffle:
            np.random.default_rng([self.seed, 0x5EED]).shuffle(idx)
        return idx

    def to_dict(self) -> dict:
        """Parameters (not counts) as plain JSON-able values, for run manifests."""
        return {
            "strategy": self.strategy,
            "cut_length": self.cut_length,
            "long_threshold": self.long_threshold,
            "long_share": self.long_share,
            "target_weights": dict(self.target_weights),
            "total_tokens": self.total_tokens,
            "upsample_domains": list(self.upsample_domains),
            "seed": self.seed,
            "own_profile": list(self.own_profile),
            "documents_emitted": int(self.counts.sum()),
            "documents_dropped": int((self.counts == 0).sum()),
            "max_repeat": int(self.counts.max()) if self.counts.size else 0,
        }


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _check_corpus(lengths, sources) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lengths int64 [N], source names [S] sorted, source id int64 [N])."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ConfigError(f"lengths must be a non-empty 1-D array of token counts, got shape {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ConfigError(f"lengths must be integers (token counts), got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if (lengths < 0).any():
        bad = int(np.flatnonzero(lengths < 0)[0])
        raise ConfigError(f"lengths[{bad}] = {int(lengths[bad])} is negative; token counts must be >= 0")
    src = np.asarray(sources)
    if src.shape != lengths.shape:
        raise ConfigError(f"sources has shape {src.shape} but lengths has {lengths.shape}: give one source per "
                          "document")
    names, ids = np.unique(src.astype(str), return_inverse=True)
    return lengths, names, ids.astype(np.int64).reshape(-1)


FLAGS = {"strategy": "--strategy", "long_threshold": "--long-threshold", "long_share": "--long-share",
         "target_weights": "--weights", "total_tokens": "--total-tokens", "upsample_domains": "--domains",
         "cut_length": "--cut-length", "seed": "--seed", "downsample_long": "--keep-long-sources"}
"""The ``megatron-lc data mix`` flag of each plan_mixture parameter: errors name the flag a user types."""


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{FLAGS[name]} {value!r}: must be an integer >= {minimum}")
    return int(value)


def _resolve_weights(target_weights, names: np.ndarray, natural: np.ndarray) -> np.ndarray:
    """float64 [S]: per-source token weights summing to 1 (default: each source's own share)."""
    if target_weights is None:
        return natural / natural.sum()
    known = {str(n): i for i, n in enumerate(names)}
    unknown = [k for k in target_weights if k not in known]
    if unknown:
        raise ConfigError(f"--weights names source(s) {unknown} that the corpus lacks; sources are {sorted(known)}")
    missing = [n for n in known if n not in target_weights]
    if missing:
        raise ConfigError(f"--weights misses source(s) {missing}; give every source a weight (0 drops it)")
    bad = [f"{k}={v!r}" for k, v in target_weights.items()
           if not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0]
    if bad:
        raise ConfigError(f"--weights {', '.join(bad)}: every weight must be a finite number >= 0")
    w = np.zeros(len(names))
    for k, v in target_weights.items():
        w[known[k]] = float(v)
    if abs(w.sum() - 1.0) > _WEIGHT_SUM_TOL:
        raise ConfigError(f"--weights sum to {w.sum():.4f}; they must sum to 1 (within {_WEIGHT_SUM_TOL})")
    empty = [str(n) for i, n in enumerate(names) if w[i] > 0 and natural[i] == 0]
    if empty:
        raise ConfigError(f"source(s) {empty} have a weight in --weights but no tokens (all documents empty); give "
                          "them weight 0")
    return w / w.sum()


# ----------------------------------------------------------------------------------------------------------------
# hitting a token target with whole documents


def _choose_counts(lens: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n]: times to emit each document of ``lens`` (int64 [n]) so their tokens sum to about ``target``.

    Every document gets ``target // lens.sum()`` copies; the remainder takes documents in a seeded random order
    (rounding to the nearer side of the last one), then single-document additions/removals shrink the gap.
    """
    counts = np.zeros(lens.size, dtype=np.int64)
    total = int(lens.sum())
    if target <= 0 or total == 0:
        return counts
    k, rem = divmod(int(target), total)
    counts += k
    if rem == 0:
        return counts
    perm = rng.permutation(lens.size)
    cs = np.cumsum(lens[perm])
    j = int(np.searchsorted(cs, rem, side="left"))  # cs[j] >= rem > cs[j-1]
    below = int(cs[j - 1]) if j > 0 else 0
    take = j + 1 if int(cs[j]) - rem <= rem - below else j
    chosen = np.zeros(lens.size, dtype=bool)
    chosen[perm[:take]] = True
    gap = rem - (int(cs[take - 1]) if take else 0)
    for _ in range(_FIXUP_ROUNDS):
        if gap == 0:
            break
        # gap > 0: add the unchosen document nearest the gap; gap < 0: drop the chosen one nearest -gap
        pool = np.flatnonzero(~chosen if gap > 0 else chosen)
        if pool.size == 0:
            break
        best = pool[np.argmin(np.abs(lens[pool] - abs(gap)))]
        if abs(abs(gap) - int(lens[best])) >= abs(gap):
            break
        chosen[best] = gap > 0
        gap += -int(lens[best]) if gap > 0 else int(lens[best])
    counts[chosen] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------
# planning


def plan_mixture(
    lengths: np.ndarray,
    sources: Sequence[str] | np.ndarray,
    strategy: str = "per_source_upsample",
    *,
    long_threshold: int = 4096,
    long_share: float = 0.7,
    target_weights: dict[str, float] | None = None,
    total_tokens: int | None = None,
    upsample_domains: Sequence[str] = (),
    cut_length: int | None = None,
    seed: int = 0,
    downsample_long: bool = True,
) -> MixturePlan:
    """Plan how often each document is emitted under ``strategy`` (see the module docstring).

    lengths: int [N] token counts; sources: [N] source names. ``target_weights`` (source -> weight, summing to 1,
    every source named; 0 drops a source) sets the base domain mixture every strategy starts from (default: the
    corpus' own token shares). ``total_tokens`` (default: the corpus' own token count) is the token budget before
    cutting. ``cut_length`` cuts every emitted document into pieces of at most that many tokens (any strategy;
    ``cut`` defaults it to ``long_threshold``). ``downsample_long`` lets a source (per_source) or the corpus
    (global) whose natural long share exceeds ``long_share`` be brought down to it; False keeps it as is.
    Raises ConfigError for impossible targets, naming the source and the fix. Deterministic given ``seed``.
    """
    lengths, names, ids = _check_corpus(lengths, sources)
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    long_threshold = _check_int("long_threshold", long_threshold, 1)
    if not isinstance(long_share, (int, float, np.floating)) or not 0.0 <= float(long_share) < 1.0:
        raise ConfigError(f"--long-share {long_share!r}: must be in [0, 1), the share of tokens from documents "
                          f"longer than --long-threshold ({long_threshold})")
    long_share = float(long_share)
    seed = _check_int("seed", seed, 0)
    natural_total = int(lengths.sum())
    if natural_total == 0:
        raise ConfigError("every document has 0 tokens; there is nothing to mix")
    own_total = total_tokens is None
    total_tokens = natural_total if own_total else _check_int("total_tokens", total_tokens, 1)
    if cut_length is None and strategy == "cut":
        cut_length = long_threshold
    if cut_length is not None:
        cut_length = _check_int("cut_length", cut_length, 1)
    domains = tuple(str(d) for d in ([upsample_domains] if isinstance(upsample_domains, str) else upsample_domains))
    if domains and strategy != "upsample_domains":
        raise ConfigError(f"--domains {','.join(domains)} is only used by --strategy upsample_domains (strategy is "
                          f"{strategy!r}); drop --domains or change the strategy")
    if strategy == "upsample_domains":
        if not domains:
            raise ConfigError("--strategy upsample_domains needs --domains, e.g. --domains books,arxiv")
        unknown = [d for d in domains if d not in set(names.tolist())]
        if unknown:
            raise ConfigError(f"--domains names source(s) {unknown} that the corpus lacks; sources are "
                              f"{names.tolist()}")

    S = len(names)
    is_long = lengths > long_threshold
    group = ids * 2 + is_long  # group 2s: short docs of source s, 2s+1: its long docs
    natural = np.bincount(group, weights=lengths, minlength=2 * S).reshape(S, 2)  # float64 [S, 2] tokens
    src_natural = natural.sum(1)
    weights = _resolve_weights(target_weights, names, src_natural)
    # base mixture: every source rescaled to its weight, its length profile unchanged
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(src_natural > 0, weights * natural_total / src_natural, 0.0)
    base = natural * scale[:, None]  # float64 [S, 2] tokens

    own = _own_profile(natural, weights, long_share, downsample_long) if strategy == "per_source_upsample" else \
        np.zeros(S, dtype=bool)
    targets = _group_targets(strategy, base, natural, names, weights, total_tokens, long_share, long_threshold,
                             domains, downsample_long, own_total, own)  # float64 [S, 2], or None: keep every doc once
    if targets is None:
        counts = np.ones(lengths.size, dtype=np.int64)
    else:
        counts = _fill_groups(lengths, group, targets, names, long_threshold, long_share, seed,
                              absorb=strategy == "per_source_upsample")
        total_tokens = round(float(targets.sum()))
    return MixturePlan(strategy=strategy, counts=counts, cut_length=cut_length, long_threshold=long_threshold,
                       long_share=long_share, target_weights={str(n): float(w) for n, w in zip(names, weights)},
                       total_tokens=total_tokens, upsample_domains=domains, seed=int(seed),
                       own_profile=tuple(str(n) for n in names[own]))


def _own_profile(natural: np.ndarray, weights: np.ndarray, ls: float, downsample_long: bool) -> np.ndarray:
    """bool [S]: sources with a budget that cannot take long share ``ls`` (per_source): no long documents while
    ``ls > 0``, or no short ones while their share would have to come down (``downsample_long``)."""
    no_long = (natural[:, 1] == 0) & (ls > 0)
    no_short = (natural[:, 0] == 0) & downsample_long
    return (weights > 0) & (no_long | no_short)


def _group_targets(strategy, base, natural, names, weights, total, ls, thr, domains, downsample_long, own_total,
                   own):
    """float64 [S, 2]: token target per (source, short/long) group; None when every document is kept once.

    ``own`` (bool [S], per_source only): sources that keep their natural length profile inside their budget."""
    base_total = base.sum()
    if strategy in ("original", "cut"):
        if np.allclose(base, natural, rtol=1e-12, atol=0.5) and total == round(float(base_total)):
            return None
        return base * (total / base_total)
    if strategy == "per_source_upsample":
        budget = weights * total
        src_base = base.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            nat_share = np.where(src_base > 0, base[:, 1] / src_base, 0.0)
        share = ls if downsample_long else np.maximum(ls, nat_share)
        share = np.where(own, nat_share, share)  # 0 (no long documents) or 1 (only long ones): their own profile
        return np.stack([budget * (1 - share), budget * share], axis=1)
    if strategy == "global_upsample":
        nat = base[:, 1].sum() / base_total
        share = ls if downsample_long else max(ls, nat)
        if share > 0 and base[:, 1].sum() == 0:
            raise ConfigError(f"no document is longer than --long-threshold {thr} tokens, so --strategy "
                              f"global_upsample cannot reach --long-share {ls}; lower --long-threshold, set "
                              "--long-share 0 or use --strategy per_source_upsample (sources keep their profile)")
        if share < 1 and base[:, 0].sum() == 0:
            raise ConfigError(f"no document has <= {thr} tokens (--long-threshold), so --strategy global_upsample "
                              f"cannot bring the long share down to --long-share {ls}; pass --keep-long-sources")
        long_t = base[:, 1] / max(base[:, 1].sum(), 1e-300) * share * total
        short_t = base[:, 0] / max(base[:, 0].sum(), 1e-300) * (1 - share) * total
        return np.stack([short_t, long_t], axis=1)
    # upsample_domains: repeat long docs of the chosen domains until the whole corpus reaches the long share
    chosen = np.isin(names, np.asarray(domains))
    long_chosen = base[chosen, 1].sum()
    if long_chosen == 0:
        raise ConfigError(f"--domains {','.join(domains)}: none has a document longer than --long-threshold {thr} "
                          "tokens in the base mixture; choose other --domains or lower --long-threshold")
    long_other = base[~chosen, 1].sum()
    short_all = base[:, 0].sum()
    # (long_other + x) / (short_all + long_other + x) = ls  =>  x = (ls * (short_all + long_other) - long_other)/(1-ls)
    x = max((ls * (short_all + long_other) - long_other) / (1 - ls), long_chosen)  # only ever upsamples
    targets = base.copy()
    targets[chosen, 1] *= x / long_chosen
    # without an explicit total_tokens the other documents stay exactly as they are and the corpus grows
    return targets if own_total else targets * (total / targets.sum())


def _fill_groups(lengths, group, targets, names, thr, ls, seed, absorb: bool) -> np.ndarray:
    """int64 [N] counts meeting ``targets`` (float64 [S, 2]).

    With ``absorb`` a source's short target absorbs the rounding of its long documents, so the source's budget is
    met tightly (per_source); without it every group is filled on its own, so a group whose target equals its
    natural size keeps every document exactly once (upsample_domains leaves the short documents alone).
    """
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(targets.size + 1))
    counts = np.zeros(lengths.size, dtype=np.int64)
    impossible = []
    for s in range(targets.shape[0]):
        budget = round(float(targets[s].sum()))
        got_long = 0
        for kind in (1, 0):  # long first, so the short target can absorb the long documents' rounding
            g = 2 * s + kind
            members = order[bounds[g]:bounds[g + 1]]
            want = round(float(targets[s, kind]))
            if kind == 0 and absorb:
                want = budget - got_long
            if want > 0 and (members.size == 0 or lengths[members].sum() == 0):
                impossible.append(f"'{names[s]}' needs {want} tokens of documents "
                                  f"{'longer than' if kind else 'of at most'} {thr} tokens and has none")
                continue
            rng = np.random.default_rng([int(seed), g])
            c = _choose_counts(lengths[members], want, rng)
            counts[members] = c
            if kind == 1:
                got_long = int((c * lengths[members]).sum())
    if impossible:
        raise ConfigError(f"the mixture cannot be met (--long-share {ls}, --long-threshold {thr}): "
                          f"{'; '.join(impossible)}; give such sources weight 0 in --weights or change "
                          "--long-threshold / --long-share")
    return counts


# ----------------------------------------------------------------------------------------------------------------
# stats, report, plot


def _pieces(lengths: np.ndarray, counts: np.ndarray, cut_length: int | None):
    """Emitted pieces as (piece lengths int64 [M], copies int64 [M], doc index int64 [M]).

    A document of length n cut at L gives n // L pieces of L and one of n % L (if non-zero); uncut documents are
    one piece. Equal pieces of one document are merged into one row with a multiplied copy count.
    """
    idx = np.arange(lengths.size, dtype=np.int64)
    if cut_length is None:
        return lengths, counts, idx
    full, rem = np.divmod(lengths, cut_length)
    has_full, has_rem = full > 0, rem > 0
    piece_len = np.concatenate([np.full(int(has_full.sum()), cut_length, dtype=np.int64), rem[has_rem]])
    copies = np.concatenate([(full * counts)[has_full], counts[has_rem]])
    doc = np.concatenate([idx[has_full], idx[has_rem]])
    return piece_len, copies, doc


def mixture_stats(lengths, sources, plan: MixturePlan | None = None, long_threshold: int = 4096) -> dict:
    """Per-source and total token/long-token stats, before (no plan) or after applying ``plan``.

    Returns {"long_threshold", "cut_length", "sources": {name: row}, "total": row}; a row has tokens, token_share,
    long_tokens, long_share (of the source's tokens), documents (emitted pieces) and max_repeat. With a plan, its
    own long_threshold is used and cut documents count as their pieces (10K cut at 4K: 4K, 4K, 2K, none long).
    """
    lengths, names, ids = _check_corpus(lengths, sources)
    if plan is not None:
        if plan.counts.shape != lengths.shape:
            raise ConfigError(f"plan has counts for {plan.counts.size} documents but the corpus has {lengths.size}; "
                              "use the plan made for this corpus")
        long_threshold = plan.long_threshold
        counts, cut = plan.counts.astype(np.int64), plan.cut_length
    else:
        counts, cut = np.ones(lengths.size, dtype=np.int64), None
    plen, copies, doc = _pieces(lengths, counts, cut)
    tok = plen * copies
    S = len(names)
    # int64 sums via bincount on float64 are exact below 2**53 tokens
    tokens = np.rint(np.bincount(ids[doc], weights=tok, minlength=S)).astype(np.int64)
    long_tokens = np.rint(np.bincount(ids[doc], weights=tok * (plen > long_threshold), minlength=S)).astype(np.int64)
    docs = np.rint(np.bincount(ids[doc], weights=copies, minlength=S)).astype(np.int64)
    max_rep = np.zeros(S, dtype=np.int64)
    np.maximum.at(max_rep, ids, counts)
    total = int(tokens.sum())

    def row(t, lt, d, m):
        return {"tokens": int(t), "token_share": t / total if total else 0.0, "long_tokens": int(lt),
                "long_share": lt / t if t else 0.0, "documents": int(d), "max_repeat": int(m)}

    return {
        "long_threshold": int(long_threshold),
        "cut_length": cut,
        "sources": {str(n): row(tokens[i], long_tokens[i], docs[i], max_rep[i]) for i, n in enumerate(names)},
        "total": row(total, long_tokens.sum(), docs.sum(), max_rep.max()),
    }


def format_report(before: dict, after: dict) -> str:
    """A terminal table comparing two :func:`mixture_stats` results, one row per source plus a total."""
    names = list(before["sources"]) + [n for n in after["sources"] if n not in before["sources"]]
    empty = {"tokens": 0, "token_share": 0.0, "long_tokens": 0, "long_share": 0.0, "documents": 0, "max_repeat": 0}
    head = ("source", "share before", "share after", "d share", "long before", "long after", "docs before",
            "docs after", "max rep")
    rows = []
    for n in names + ["TOTAL"]:
        b = before["total"] if n == "TOTAL" else before["sources"].get(n, empty)
        a = after["total"] if n == "TOTAL" else after["sources"].get(n, empty)
        rows.append((n, f"{100 * b['token_share']:.2f}%", f"{100 * a['token_share']:.2f}%",
                     f"{100 * (a['token_share'] - b['token_share']):+.2f}pt", f"{100 * b['long_share']:.1f}%",
                     f"{100 * a['long_share']:.1f}%", str(b["documents"]), str(a["documents"]), str(a["max_repeat"])))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    thr = after.get("long_threshold", before.get("long_threshold"))
    title = (f"long = more than {thr} tokens; tokens before {before['total']['tokens']:,}, "
             f"after {after['total']['tokens']:,}")
    out = [title, line(head), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows[:-1]] + ["-+-".join("-" * w for w in widths), line(rows[-1])]
    return "\n".join(out)


LEGEND_SOURCES = 9
"""The plot names this many sources (the largest by tokens); the rest are drawn and listed as one "other"."""
OTHER = "other"


def _legend_groups(names: np.ndarray, tokens: np.ndarray, top: int) -> tuple[list[str], np.ndarray]:
    """(group labels, group id int64 [S] of each source): the ``top`` sources with most ``tokens`` (float [S]), in
    that order, then one ``other`` group for the rest (only when the rest holds two or more sources)."""
    order = sorted(range(len(names)), key=lambda i: (-tokens[i], str(names[i])))
    kept = order[:top] if len(names) > top + 1 else order  # never an "other" of a single source
    group = np.full(len(names), len(kept), dtype=np.int64)
    group[kept] = np.arange(len(kept))
    labels = [str(names[i]) for i in kept] + ([OTHER] if len(kept) < len(names) else [])
    return labels, group


def _group_colours(n: int) -> list:
    """``n`` distinct colours for named sources: tab10 without its grey (kept for ``other``), tab20 past 9."""
    from matplotlib import colormaps

    tab10 = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # index 7 is the grey
    pool = tab10 if n <= len(tab10) else list(colormaps["tab20"].colors)
    if n > len(pool):
        raise ValueError(f"{n} legend groups but only {len(pool)} distinct colours; lower the number of sources named")
    return pool[:n]


def plot_lengths(lengths, sources, plan: MixturePlan, path, *, bins: int = 60, figsize=(12.0, 4.5),
                 dpi: int = 100, legend_sources: int = LEGEND_SOURCES):
    """Write a PNG of the token-weighted document-length histogram (log x), before | after ``plan``, stacked by
    source, with the long threshold marked, and return its matplotlib ``Figure``. The ``legend_sources`` sources
    with most tokens after the plan (then before) are drawn and named one by one, the rest as one grey "other", so
    the legend of a 31-source corpus still fits; every legend entry has its own colour. The image is
    ``figsize * dpi`` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: leaves the global backend alone
    from matplotlib.figure import Figure

    lengths, names, ids = _check_corpus(lengths, sources)
    if plan.counts.shape != lengths.shape:
        raise ConfigError(f"plan has counts for {plan.counts.size} documents but the corpus has {lengths.size}")
    if legend_sources < 1:
        raise ConfigError(f"legend_sources = {legend_sources!r}: the legend must name at least one source")
    lo = max(int(lengths[lengths > 0].min()) if (lengths > 0).any() else 1, 1)
    edges = np.geomspace(lo, max(int(lengths.max()), lo + 1) + 1, bins + 1)
    after_tokens = np.bincount(ids, weights=lengths * plan.counts, minlength=len(names))
    before_tokens = np.bincount(ids, weights=lengths, minlength=len(names))
    # rank by tokens after, ties (e.g. dropped sources, 0 after) by tokens before
    labels, group = _legend_groups(names, after_tokens + before_tokens / (before_tokens.sum() + 1.0), legend_sources)
    named = len(labels) - (labels[-1] == OTHER)
    colours = _group_colours(named) + (["#7f7f7f"] if named < len(labels) else [])  # tab10's grey for "other"
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("before (original)", np.ones(lengths.size, dtype=np.int64), None),
              (f"after ({plan.strategy})", plan.counts.astype(np.int64), plan.cut_length))
    for ax, (title, counts, cut) in zip(axes, panels):
        plen, copies, doc = _pieces(lengths, counts, cut)
        tok = (plen * copies).astype(np.float64)
        total = tok.sum() or 1.0
        g = group[ids[doc]]
        data = [np.maximum(plen[g == i], 1) for i in range(len(labels))]
        w = [tok[g == i] / total for i in range(len(labels))]
        ax.hist(data, bins=edges, weights=w, stacked=True, label=labels, color=colours)
        ax.axvline(plan.long_threshold, color="k", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("document length (tokens)")
        ax.set_title(title)
    axes[0].set_ylabel("share of tokens")
    handles, _ = axes[1].get_legend_handles_labels()
    title = f"source ({len(names) - legend_sources} more as {OTHER})" if labels[-1] == OTHER else "source"
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title, title_fontsize=8)
    fig.savefig(str(path), dpi=dpi)
    return fig
