"""Needle in a haystack: hide one sentence in long filler text, ask for it back, over a grid of lengths x depths.

Two variants (templates as their authors published them):
- ``original`` (Kamradt): the San Francisco sandwich sentence; scored by the regex ``sandwich.+?dolores.+?sunny``
  (360's convention) or by word recall of the answer (Fu et al.).
- ``value`` (Arize value retrieval): "The special magic {city} number is: {7 digits}."; scored by exact match.

Everything is in token space of one tokenizer (``encode(str) -> list[int]``, ``decode(ids) -> str``). A prompt of
context length L is ``haystack[:i] + needle + haystack[i:n] + question``, where ``n`` is chosen so that the prompt
plus ``max_new_tokens`` of answer fit in L (or, with ``question_reserve``, a fixed budget as Kamradt's 200 tokens),
and ``i`` is the token at ``depth`` percent of the haystack, backed off to the previous sentence end.

The model plugs in as ``answer_fn(prompt_ids: list[int]) -> str`` (the generated text after the prompt), so a
scripted oracle and a real model go through the same grid code. The grid can be split over processes
(``rank``/``world_size`` pick cells, ``merge_results`` joins them); nothing here assumes one process.
"""
from __future__ import annotations

import os
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .. import files
from ..configtools import ConfigError
from ..data.stdlib_text import stdlib_docstring_text

# ---- templates --------------------------------------------------------------------------------------------------
CITIES = ("Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle", "Lagos",
          "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia", "Victoria",
          "Tashkent", "Mumbai", "Barcelona", "Lima", "Oslo", "Hanoi")


@dataclass(frozen=True)
class Needle:
    """One needle instance: the sentence hidden in the haystack, the question, the answer prefix the prompt ends
    with (so a base model completes rather than chats), and the gold answer its output is scored against."""

    text: str
    question: str
    answer_prefix: str
    answer: str


ORIGINAL_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
ORIGINAL_REGEX = r"sandwich.+?dolores.+?sunny"
VARIANTS = ("value", "original")
SCORINGS = ("exact", "regex", "recall")
DEFAULT_SCORING = {"value": "exact", "original": "regex"}


def make_needle(variant: str, rng: random.Random) -> Needle:
    """A needle of ``variant`` (value | original); value retrieval draws a city and a 7-digit number from ``rng``."""
    if variant == "original":
        return Needle(ORIGINAL_NEEDLE, "What is the best thing to do in San Francisco?",
                      "Answer: The best thing to do in San Francisco is",
                      "eat a sandwich and sit in Dolores Park on a sunny day.")
    if variant == "value":
        city = rng.choice(CITIES)
        number = str(rng.randrange(1_000_000, 10_000_000))
        return Needle(f"The special magic {city} number is: {number}.", f"What is the special magic {city} number?",
                      f"Answer: The special magic {city} number is:", number)
    raise ConfigError(f"unknown NIAH variant {variant!r}: use one of {VARIANTS}")


def question_text(needle: Needle) -> str:
    """The text after the haystack: a blank line, the question, the answer prefix."""
    return f"\n\nQuestion: {needle.question}\n{needle.answer_prefix}"


# ---- scoring ----------------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def exact_match(output: str, answer: str) -> float:
    """1.0 if ``output`` (leading whitespace stripped) starts with ``answer`` and the answer is not the start of a
    longer word or number (``1234567`` in ``12345678`` is wrong), else 0.0."""
    out = output.lstrip()
    if not out.startswith(answer):
        return 0.0
    rest = out[len(answer):]
    return 0.0 if rest[:1].isalnum() else 1.0


def regex_match(output: str, pattern: str = ORIGINAL_REGEX) -> float:
    """1.0 if ``pattern`` is found in ``output`` (case-insensitive, ``.`` matches newlines), else 0.0."""
    return 1.0 if re.search(pattern, output, flags=re.IGNORECASE | re.DOTALL) else 0.0


def word_recall(output: str, answer: str) -> float:
    """Fraction of the answer's words (lowercased, punctuation removed) that appear among the output's words."""
    gold = _words(answer)
    if not gold:
        raise ValueError("word_recall needs an answer with at least one word")
    got = set(_words(output))
    return sum(w in got for w in gold) / len(gold)


def score(output: str, needle: Needle, scoring: str) -> float:
    """Score in [0, 1] of ``output`` for ``needle`` by ``scoring`` (exact | regex | recall)."""
    if scoring == "exact":
        return exact_match(output, needle.answer)
    if scoring == "regex":
        # The original needle has its fixed regex; for value retrieval the number itself is the pattern.
        return regex_match(output, ORIGINAL_REGEX if needle.text == ORIGINAL_NEEDLE else re.escape(needle.answer))
    if scoring == "recall":
        return word_recall(output, needle.answer)
    raise ConfigError(f"unknown scoring {scoring!r}: use one of {SCORINGS}")


# ---- haystack ---------------------------------------------------------------------------------------------------
def is_dataset(path: str) -> bool:
    """Whether ``path`` names a token dataset rather than a text file: a ``.bin`` or ``.idx`` path, or a PREFIX
    (as train's ``data.train_tokens``) that is no file itself but has PREFIX.bin and PREFIX.idx beside it."""
    if path.endswith((".bin", ".idx")):
        return True
    return not os.path.isfile(path) and all(os.path.isfile(path + ext) for ext in (".bin", ".idx"))


def load_haystack(path: str | None, tokenizer, vocab_size: int | None = None, flag: str = "--haystack") -> list[int]:
    """Haystack tokens: ``path`` None -> the stdlib docstrings; a Megatron indexed dataset (``is_dataset``: its
    PREFIX, ``.bin`` or ``.idx``; ``megatron_lc.data.indexed``) -> all its documents' ids in file order (the dtype
    comes from the ``.idx``; ids must be below ``vocab_size``; ``tokenizer`` is not used); any other file -> its
    UTF-8 text, encoded. A bad path is a ConfigError naming ``flag``."""
    if path is None:
        return tokenizer.encode(stdlib_docstring_text())
    dataset = is_dataset(path)
    if not os.path.isfile(path) and not dataset:
        raise ConfigError(f"{flag} {path}: no such file, and no dataset {path}.bin + {path}.idx; give a text file or "
                          f"a token dataset (its PREFIX, as train's data.train_tokens, or its .bin/.idx file)")
    if dataset:
        from ..data.indexed import IndexedDataset

        ids = IndexedDataset(path).tokens
        if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
            raise ConfigError(f"{flag} {path}: token id {int(ids.max())} is outside the model's vocabulary of "
                              f"{vocab_size}: was the dataset written with this model's tokenizer?")
        return ids.astype("int64").tolist()
    with open(path, encoding="utf-8", errors="replace") as f:
        return tokenizer.encode(f.read())


class SentenceEnds:
    """Which token ids end a sentence: those whose decoded text, right-stripped, ends with ``.``, ``!`` or ``?``
    (a BPE vocabulary merges periods with quotes or newlines, so a fixed id list would miss some)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bool] = {}

    def __call__(self, token: int) -> bool:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self.tokenizer.decode([token]).rstrip().endswith((".", "!", "?"))
        return hit


def insertion_point(haystack: Sequence[int], depth: float, is_sentence_end: Callable[[int], bool]) -> int:
    """Token index where the needle goes: ``depth`` percent of ``len(haystack)``, backed off to just after the previous
    sentence end (0 if there is none before it). Depth 100 is the very end."""
    check_depth(depth)
    n = len(haystack)
    if depth >= 100:
        return n
    i = int(n * depth / 100)
    while i > 0 and not is_sentence_end(haystack[i - 1]):
        i -= 1
    return i


def check_depth(depth: float) -> None:
    if not 0 <= depth <= 100:
        raise ConfigError(f"needle depth {depth} is outside 0-100: depths are percent of the haystack "
                          f"(0 = start, 100 = end), e.g. --depths 0,25,50,75,100")


@dataclass
class Prompt:
    """A built NIAH prompt: ``ids`` (list of int token ids), where the needle starts (token index) and its depth."""

    ids: list[int]
    needle_start: int
    haystack_tokens: int


def build_prompt(haystack: Sequence[int], length: int, depth: float, needle: Needle, tokenizer,
                 max_new_tokens: int, question_reserve: int | None = None,
                 is_sentence_end: Callable[[int], bool] | None = None) -> Prompt:
    """The prompt for context ``length``: haystack prefix with the needle at ``depth`` %, then the question.

    The haystack takes ``length - needle - reserve`` tokens, where the reserve is ``question_reserve`` if given
    (Kamradt uses 200) or exactly the question's tokens plus ``max_new_tokens`` (prompt + answer = length).
    """
    check_depth(depth)
    needle_ids = tokenizer.encode(" " + needle.text)  # after a sentence end, as prose continues
    question_ids = tokenizer.encode(question_text(needle))
    reserve = len(question_ids) + max_new_tokens if question_reserve is None else question_reserve
    if question_reserve is not None and question_reserve < len(question_ids):
        raise ConfigError(f"--question-reserve {question_reserve} is smaller than the question's "
                          f"{len(question_ids)} tokens: raise it or leave it out (exact fit)")
    n = length - len(needle_ids) - reserve
    if n < 1:
        raise ConfigError(f"context length {length} is too short for the needle ({len(needle_ids)} tokens) plus the "
                          f"question and answer ({reserve} tokens): use lengths of at least "
                          f"{len(needle_ids) + reserve + 1} tokens")
    if len(haystack) < n:
        raise ConfigError(f"the haystack has {len(haystack)} tokens; context length {length} needs {n}: give a longer "
                          f"--haystack file or lower the largest --lengths")
    hay = haystack[:n]
    i = insertion_point(hay, depth, is_sentence_end or SentenceEnds(tokenizer))
    ids = list(hay[:i]) + needle_ids + list(hay[i:]) + question_ids
    return Prompt(ids, i, n)


# ---- the grid ---------------------------------------------------------------------------------------------------
AnswerFn = Callable[[list[int]], str]


def parse_grid(lengths: Iterable[int], depths: Iterable[float]) -> tuple[list[int], list[float]]:
    """Validated, sorted, de-duplicated lengths (positive ints) and depths (0-100)."""
    lengths, depths = sorted({int(x) for x in lengths}), sorted({float(d) for d in depths})
    if not lengths or not depths:
        raise ConfigError("the NIAH grid needs at least one length and one depth")
    for length in lengths:
        if length <= 0:
            raise ConfigError(f"context length {length} must be a positive number of tokens")
    for d in depths:
        check_depth(d)
    return lengths, depths


def run_grid(answer_fn: AnswerFn, tokenizer, haystack: Sequence[int], lengths: Iterable[int],
             depths: Iterable[float], variant: str = "value", scoring: str | None = None, trials: int = 1,
             seed: int = 0, max_new_tokens: int = 32, question_reserve: int | None = None, rank: int = 0,
             world_size: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """Score ``answer_fn`` on every (length, depth, trial) cell; return the results dict (see ``summarize``).

    Before any model call, the longest length is checked against the haystack and the needle (so a bad input fails
    at once). With ``world_size > 1`` this process does cells ``rank, rank + world_size, ...``; join the parts
    with ``merge_results``. Needles are drawn per cell from ``seed``, so every split draws the same needles.
    """
    lengths, depths = parse_grid(lengths, depths)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown NIAH variant {variant!r}: use one of {VARIANTS}")
    scoring = scoring or DEFAULT_SCORING[variant]
    if scoring not in SCORINGS:
        raise ConfigError(f"unknown scoring {scoring!r}: use one of {SCORINGS}")
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    ends = SentenceEnds(tokenizer)
    # Fail before the first (possibly slow) model call if the longest cell cannot be built.
    build_prompt(haystack, lengths[-1], depths[0], make_needle(variant, random.Random(seed)), tokenizer,
                 max_new_tokens, question_reserve, ends)
    cells = [(length, depth, t) for length in lengths for depth in depths for t in range(trials)]
    records = []
    for index in range(rank, len(cells), world_size):
        length, depth, trial = cells[index]
        rng = random.Random(f"{seed}:{length}:{depth}:{trial}")
        needle = make_needle(variant, rng)
        prompt = build_prompt(haystack, length, depth, needle, tokenizer, max_new_tokens, question_reserve, ends)
        output = answer_fn(prompt.ids)
        s = score(output, needle, scoring)
        records.append({"length": length, "depth": depth, "trial": trial, "score": s, "answer": needle.answer,
                        "output": output, "prompt_tokens": len(prompt.ids), "needle_token": prompt.needle_start})
        if progress:
            progress(f"length {length:>7} depth {depth:5.1f}% trial {trial}: score {s:.2f}  output {output!r:.60}")
    return summarize({"variant": variant, "scoring": scoring, "lengths": lengths, "depths": depths,
                      "trials": trials, "seed": seed, "cells": records})


def merge_results(parts: Sequence[dict]) -> dict:
    """Join the results of ``run_grid`` run on several processes (same grid, different cells) into one."""
    if not parts:
        raise ValueError("merge_results needs at least one part")
    merged = {k: v for k, v in parts[0].items() if k not in ("cells", "mean", "overall")}
    merged["cells"] = sorted((c for p in parts for c in p["cells"]),
                             key=lambda c: (c["length"], c["depth"], c["trial"]))
    return summarize(merged)


def summarize(results: dict) -> dict:
    """Add ``mean`` (``[len(depths)][len(lengths)]``, mean score per cell over trials, None where no cell ran) and
    ``overall`` (mean over all cells) to a results dict."""
    lengths, depths = results["lengths"], results["depths"]
    sums = [[0.0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    for c in results["cells"]:
        i, j = depths.index(c["depth"]), lengths.index(c["length"])
        sums[i][j] += c["score"]
        counts[i][j] += 1
    results["mean"] = [[s / n if n else None for s, n in zip(srow, nrow)] for srow, nrow in zip(sums, counts)]
    scores = [c["score"] for c in results["cells"]]
    results["overall"] = sum(scores) / len(scores) if scores else None
    return results


def model_answer_fn(model, tokenizer, max_new_tokens: int) -> AnswerFn:
    """``answer_fn`` of a model: greedy decode (megatron_lc.model.generate, temperature 0) of up to
    ``max_new_tokens`` after the prompt, stopping at the tokenizer's EOS; returns the decoded new tokens only.
    Only the model's public forward is used, so its config's positions (RoPE base, YaRN, DCA) apply as they are."""
    import torch

    from ..model import generate

    device = next(model.parameters()).device

    def answer(prompt_ids: list[int]) -> str:
        ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
        out = generate(model, ids, max_new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt_ids):].tolist())

    return answer


def sharded_answer_fn(model, cp, tokenizer, max_new_tokens: int) -> AnswerFn:
    """``answer_fn`` for a model spread over the ring ``cp`` (``cp.apply(model)`` done): ring prefill of the prompt,
    then greedy decode over a KV cache sharded across the ranks (``generate_sharded``); every rank must call it with
    the same prompt and gets the same text, equal to ``model_answer_fn``'s token for token."""
    import torch

    from ..parallel.sharded_generate import generate_sharded

    device = next(model.parameters()).device

    def answer(prompt_ids: list[int]) -> str:
        ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
        out = generate_sharded(model, cp, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt_ids):].tolist())

    return answer


# ---- output -----------------------------------------------------------------------------------------------------
def write_json(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_json(path, results)


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_heatmap(results: dict, path: str, train_length: int | None = None, title: str | None = None,
                 train_label: str | None = None):
    """Heatmap PNG of the mean score: depth (%) on y, context length on x, 0 red -> 1 green; a dashed vertical
    line at ``train_length`` (between the last length <= it and the next), labelled ``train_label`` (default
    "training length N"). Returns the matplotlib Figure (closed: saved, not shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = results["lengths"], results["depths"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in results["mean"]], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(lengths) + 2.5), max(3.5, 0.35 * len(depths) + 1.5)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], rotation=45 if len(lengths) > 8 else 0)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    if train_length is not None:
        x = sum(n <= train_length for n in lengths) - 0.5
        ax.axvline(x, color="black", linestyle="--", linewidth=1.5,
                   label=train_label or f"training length {train_length:,}")
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.18), frameon=False, fontsize=8)
    overall = results.get("overall")
    ax.set_title(title or f"NIAH ({results['variant']}, {results['scoring']})"
                 + (f": mean {overall:.2f}" if overall is not None else ""))
    fig.colorbar(image, ax=ax, label="mean score")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
