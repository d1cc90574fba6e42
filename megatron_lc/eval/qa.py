"""Long-context question answering (``megatron-lc eval qa``): prompts, greedy answers, EM and token F1, results
by context length and by gold depth.

Input, one JSON record per line, two forms (each record says which by its keys):

- LongBench (``{"input", "context", "answers", "length"?, "_id"?}``): the prompt is a template filled with the
  context and the question (LongBench's multi-doc QA one by default, from its ``config/dataset2prompt.json``),
  sent as one user turn of ChatML (or as raw text: ``chat=False``).
- our synthetic QA (``megatron-lc data synth-qa``: ``{"messages", "qa", "meta"}``): one prompt per ``qa`` item, the
  chat's messages before the assistant turn that answers it (earlier turns keep their gold answers, as history),
  rendered as ChatML with the default system message and the generation prompt. ``qa[i]["turn"]`` is the index
  of its assistant message among the assistant messages; ``depth`` in [0, 1] is where its gold text starts.

Prompts longer than ``max_length`` tokens keep their first and last halves (LongBench's middle truncation: the
instructions sit at both ends), and are counted. Answers are decoded greedily up to ``<|im_end|>``, EOS or
``max_new_tokens``. Scores follow LongBench's English QA metric (its ``metrics.py``: ``normalize_answer``,
``qa_f1_score``), written here: lowercase, drop ASCII punctuation (``string.punctuation``), drop the words a/an/the,
collapse whitespace; F1 over the multisets of whitespace tokens; exact match of the normalised strings; the max over
the gold answers; x100. Text outside ASCII is kept as it is: Unicode letters are lowercased (``str.lower``), but
non-ASCII punctuation (curly quotes, dashes, CJK marks) stays part of its word, and text without spaces (Chinese)
is one token. That is what LongBench does for its English sets; its Chinese sets use jieba word segmentation,
which this module does not do.
"""
from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..configtools import ConfigError
from ..data.chat_template import DEFAULT_SYSTEM, encode_chatml, render_chatml, reply_text, stop_tokens

# ---- scoring ----------------------------------------------------------------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench's ``normalize_answer``: lowercase, drop ASCII punctuation, replace the words a/an/the by a space,
    collapse whitespace (in this order)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: list[str], gold: list[str]) -> float:
    """F1 in [0, 1] of two token lists as multisets (0 when they share nothing, so also when either is empty)."""
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of gold strings, got {answers!r}")


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's ``qa_f1_score`` (normalised whitespace tokens), the max over the gold ``answers``, x100."""
    _check_answers(answers)
    words = normalize_answer(prediction).split()
    return 100.0 * max(_f1(words, normalize_answer(a).split()) for a in answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """100 if the normalised prediction equals some normalised gold answer, else 0."""
    _check_answers(answers)
    said = normalize_answer(prediction)
    return 100.0 if any(said == normalize_answer(a) for a in answers) else 0.0


# ---- prompts ----------------------------------------------------------------------------------------------------
_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
             "words.")
TEMPLATES = {
    # LongBench config/dataset2prompt.json: hotpotqa, 2wikimqa and musique share this one
    "multi-doc": (f"{_PASSAGES}\n\nThe following are given passages.\n{{context}}\n\n{_PASSAGES}\n\n"
                  "Question: {input}\nAnswer:"),
    # LongBench multifieldqa_en
    "single-doc": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                   "based on the above text, only give me the answer and do not output any other words.\n\n"
                   "Question: {input}\nAnswer:"),
}
"""LongBench's prompts by name; ``--template`` takes a name or a text holding ``{context}`` and ``{input}``."""


def resolve_template(spec: str) -> str:
    """A template name of TEMPLATES, or a text with both ``{context}`` and ``{input}``; else a ConfigError."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    missing = [p for p in ("{context}", "{input}") if p not in spec]
    if missing:
        raise ConfigError(f"--template {spec!r}: not one of {sorted(TEMPLATES)} and has no {' or '.join(missing)}; "
                          f"give a name or a text with both placeholders")
    return spec


@dataclass
class QAItem:
    """One question to answer. ``messages``: the ChatML messages before the answer (synthetic), or None with
    ``prompt`` the filled template (LongBench); ``depth`` in [0, 1] or None; ``length``: LongBench's own
    ``length`` field (words of its context) or None."""

    id: str
    where: str
    form: str
    question: str
    answers: list[str]
    messages: list[dict] | None = None
    prompt: str | None = None
    depth: float | None = None
    length: int | None = None


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(a, str) for a in value)


def _longbench_item(record: dict, where: str, template: str) -> QAItem:
    for key in ("input", "context"):
        if not isinstance(record.get(key), str):
            raise ConfigError(f"{where}: LongBench record's {key!r} must be text, got {record.get(key)!r:.80}")
    if not _strings(record.get("answers")):
        raise ConfigError(f"{where}: 'answers' must be a non-empty list of strings, got {record.get('answers')!r:.80}")
    length = record.get("length")
    prompt = template.replace("{context}", record["context"]).replace("{input}", record["input"])
    return QAItem(id=str(record.get("_id", where)), where=where, form="longbench", question=record["input"],
                  answers=list(record["answers"]), prompt=prompt, length=length if isinstance(length, int) else None)


def _synthetic_items(record: dict, where: str, drop_gold: bool = False) -> list[QAItem]:
    messages, qa = record["messages"], record["qa"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if not isinstance(qa, list) or not qa:
        raise ConfigError(f"{where}: 'qa' must be a non-empty list of questions, got {qa!r:.80}")
    answer_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    items = []
    for k, q in enumerate(qa):
        turn = q.get("turn") if isinstance(q, dict) else None
        if not isinstance(turn, int) or not 0 <= turn < len(answer_at):
            raise ConfigError(f"{where}: qa[{k}]['turn'] is {turn!r}, but the chat has {len(answer_at)} assistant "
                              f"messages (turn indexes them from 0)")
        if not _strings(q.get("answers")):
            raise ConfigError(f"{where}: qa[{k}]['answers'] must be a non-empty list of strings, got "
                              f"{q.get('answers')!r:.80}")
        depth = q.get("depth")
        if depth is not None and not (isinstance(depth, (int, float)) and 0 <= depth <= 1):
            raise ConfigError(f"{where}: qa[{k}]['depth'] must be in [0, 1] (or absent), got {depth!r}")
        chat = _without_gold(record, q, where) if drop_gold else messages
        items.append(QAItem(id=f"{where}:q{k}", where=where, form="synthetic", question=str(q.get("question", "")),
                            answers=list(q["answers"]),
                            messages=chat[:answer_at[turn]], depth=None if depth is None else float(depth)))
    return items


def _without_gold(record: dict, q: dict, where: str) -> list[dict]:
    """The chat's messages with ``q``'s gold documents out of its context (synth_qa.without_documents)."""
    from ..data.synth_qa import without_documents

    gold = q.get("gold_docs")
    meta = record.get("meta")
    titles = meta.get("titles") if isinstance(meta, dict) else None
    if not (isinstance(gold, list) and gold and isinstance(titles, list)
            and all(isinstance(g, int) and 0 <= g < len(titles) for g in gold)):
        raise ConfigError(f"{where}: --drop-gold needs each question's 'gold_docs' (indexes of meta.titles) and "
                          f"'meta.titles', as data synth-qa writes them; got gold_docs {gold!r:.40}")
    try:
        return without_documents(record, gold)
    except ValueError as e:
        raise ConfigError(f"{where}: --drop-gold: {e}") from None


def read_items(paths: Iterable[str], template: str = TEMPLATES["multi-doc"], drop_gold: bool = False) -> list[QAItem]:
    """Every question of the JSONL (or .jsonl.gz) files ``paths``, in order. A line that is not JSON, of neither
    form, or with a bad field is a ConfigError naming its file:line, before any model work. ``drop_gold``: each
    synthetic question is asked with its gold documents taken out of the context (the no-evidence control);
    LongBench records have no gold documents, so they are refused then."""
    from ..data.documents import raw_lines

    items = []
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--data {path}: no such file; give a LongBench or synth-qa JSONL file")
        for number, raw in raw_lines(path):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: not JSON ({e})") from None
            if isinstance(record, dict) and "messages" in record and "qa" in record:
                items.extend(_synthetic_items(record, where, drop_gold))
            elif isinstance(record, dict) and "answers" in record and "input" in record:
                if drop_gold:
                    raise ConfigError(f"{where}: --drop-gold applies to synth-qa chats, whose gold documents are "
                                      f"known; this is a LongBench record")
                items.append(_longbench_item(record, where, template))
            else:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"{where}: neither a LongBench record (input, context, answers) nor a synth-qa "
                                  f"chat (messages, qa); it has {keys}")
    if not items:
        raise ConfigError(f"--data {list(paths)}: no questions found")
    return items


def prompt_text(item: QAItem, chat: bool = True, system: str | None = DEFAULT_SYSTEM) -> str:
    """The text the model continues: ChatML with ``system`` first when the chat has none (None: no system turn)
    and the generation prompt; with ``chat=False`` a LongBench item's filled template as it is."""
    if item.messages is None and not chat:
        return item.prompt
    messages = item.messages if item.messages is not None else [{"role": "user", "content": item.prompt}]
    return render_chatml(messages, add_generation_prompt=True, default_system=system)


def check_prompts(items: Sequence[QAItem], chat: bool = True, system: str | None = DEFAULT_SYSTEM) -> None:
    """Render every prompt once (cheap next to decoding) so that a message ChatML refuses (one holding a marker,
    a bad role) is a ConfigError naming its file:line before any model work."""
    for item in items:
        try:
            prompt_text(item, chat, system)
        except ConfigError as e:
            raise ConfigError(f"{item.where}: {e}") from None


# ---- tokens -----------------------------------------------------------------------------------------------------
def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """``ids`` if they fit ``max_length``, else their first ``max_length // 2`` and last ``max_length -
    max_length // 2`` ids (LongBench's middle truncation)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(ids) <= max_length:
        return list(ids)
    head = max_length // 2
    return [*ids[:head], *ids[len(ids) - (max_length - head):]]


# ---- the run ----------------------------------------------------------------------------------------------------
GenerateFn = Callable[[list[int]], list[int]]
"""prompt ids -> the generated ids after them."""


def model_generate_fn(model, stops: Sequence[int], max_new_tokens: int, cp=None) -> GenerateFn:
    """Greedy decoding with a KV cache (``megatron_lc.model.generate``) up to a stop id or ``max_new_tokens``.
    With ``cp`` (a ring ContextParallel; every rank must call with the same prompt) a prompt longer than
    ``cp.multiple()`` is prefilled over the ring and decoded over a KV cache sharded across the ranks
    (``generate_sharded``); a shorter one runs whole on every rank. The function applies ``cp`` to the model."""
    import torch

    from ..model import generate

    device = next(model.parameters()).device
    stops = list(stops)
    plain = model.layers[0].attn.attn_fn
    if cp is not None:
        if model.config.dual_chunk_attention:
            raise ConfigError("eval qa under torchrun (sharded decode) does not run Dual Chunk Attention models: run "
                              "it in one process")
        from ..parallel.sharded_generate import generate_sharded

        cp.apply(model)
        ring = model.layers[0].attn.attn_fn

    def run(prompt_ids: list[int]) -> list[int]:
        ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
        if cp is not None and len(prompt_ids) > cp.multiple():
            out = generate_sharded(model, cp, ids, max_new_tokens, eos_token_id=stops)
        else:
            if cp is not None:  # too short to shard: every rank decodes it whole, with plain attention
                model.set_attention(plain)
            try:
                out = generate(model, ids, max_new_tokens, eos_token_id=stops)
            finally:
                if cp is not None:
                    model.set_attention(ring)
        return out[0, len(prompt_ids):].tolist()

    return run


def run_items(items: Sequence[QAItem], tokenizer, generate_fn: GenerateFn, max_length: int, *, chat: bool = True,
              system: str | None = DEFAULT_SYSTEM, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Answer and score every item; returns one record per item: id, where, form, question, answers, prediction, em, f1
    (0-100), prompt_tokens (what the model saw), truncated_from (the full prompt's tokens, or None), depth, length,
    ended ("stop" or "max_new_tokens")."""
    from ..train.metrics import format_duration

    stops = stop_tokens(tokenizer)
    records, t0 = [], time.perf_counter()
    for n, item in enumerate(items, 1):
        text = prompt_text(item, chat, system)
        full = encode_chatml(tokenizer, text) if (chat or item.messages is not None) else tokenizer.encode(text)
        ids = truncate_middle(full, max_length)
        prediction, stopped = reply_text(tokenizer, generate_fn(ids), stops)
        prediction, ended = prediction.strip(), "stop" if stopped else "max_new_tokens"
        record = {"id": item.id, "where": item.where, "form": item.form, "question": item.question,
                  "answers": item.answers,
                  "prediction": prediction, "em": exact_match(prediction, item.answers),
                  "f1": token_f1(prediction, item.answers), "prompt_tokens": len(ids),
                  "truncated_from": len(full) if len(full) > len(ids) else None, "depth": item.depth,
                  "length": item.length, "ended": ended}
        records.append(record)
        if progress:
            elapsed = time.perf_counter() - t0
            eta = format_duration(elapsed / n * (len(items) - n))
            progress(f"[{n}/{len(items)}] {n / elapsed:.2f} q/s, ETA {eta}: {len(ids)} tokens, F1 {record['f1']:.0f}"
                     f"  {prediction!r:.60}")
    return records


# ---- results ----------------------------------------------------------------------------------------------------
def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def length_edges(prompt_tokens: Iterable[int], edges: Sequence[int] | None = None) -> list[int]:
    """Bucket edges in tokens: ``edges`` (sorted, each > 0) with 0 first, or powers of two spanning the data."""
    if edges:
        if any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
            raise ConfigError(f"--length-buckets {list(edges)}: want increasing positive token counts, e.g. "
                              f"4000,8000")
        return [0, *edges]
    top = max(prompt_tokens)
    lo = 2 ** int(math.log2(max(1, min(prompt_tokens))))
    out = [lo]
    while out[-1] <= top:
        out.append(out[-1] * 2)
    return out


def _mean(records: list[dict], key: str) -> float | None:
    return sum(r[key] for r in records) / len(records) if records else None


def _group(label: str, records: list[dict], **bounds) -> dict:
    return {"bucket": label, **bounds, "items": len(records), "em": _mean(records, "em"), "f1": _mean(records, "f1")}


def summarize(records: list[dict], edges: Sequence[int] | None = None, depth_buckets: int = 5) -> dict:
    """Results: overall em/f1 (0-100), items, truncated; ``by_length``: per prompt-token bucket [lo, hi) (the
    prompt's full length, before truncation; the last bucket of ``edges`` given open-ended); ``by_depth``: per
    fraction of [0, 1] (items with a depth); ``grid``: f1 [depth bucket][length bucket] (None where empty)."""
    full = [r["truncated_from"] or r["prompt_tokens"] for r in records]
    given = bool(edges)
    cuts = length_edges(full, edges)
    n_len = len(cuts) if given else len(cuts) - 1

    def length_bucket(n: int) -> int:
        return min(sum(n >= c for c in cuts) - 1, n_len - 1)

    len_labels = [f"{_tokens_label(cuts[i])}-{_tokens_label(cuts[i + 1])}" if i + 1 < len(cuts)
                  else f"{_tokens_label(cuts[i])}+" for i in range(n_len)]
    depth_labels = [f"{100 * i / depth_buckets:g}-{100 * (i + 1) / depth_buckets:g}%" for i in range(depth_buckets)]

    def depth_bucket(d: float) -> int:
        return min(int(d * depth_buckets), depth_buckets - 1)

    by_len = [[r for r, n in zip(records, full) if length_bucket(n) == i] for i in range(n_len)]
    deep = [r for r in records if r["depth"] is not None]
    by_depth = [[r for r in deep if depth_bucket(r["depth"]) == i] for i in range(depth_buckets)] if deep else []
    grid = [[_mean([r for r in by_len[j] if r["depth"] is not None and depth_bucket(r["depth"]) == i], "f1")
             for j in range(n_len)] for i in range(depth_buckets)] if deep else []
    keep = [i for i, group in enumerate(by_len) if group]  # buckets no prompt falls in are left out of the tables
    return {"items": len(records), "em": _mean(records, "em"), "f1": _mean(records, "f1"),
            "truncated": sum(r["truncated_from"] is not None for r in records),
            "forms": dict(Counter(r["form"] for r in records)),
            "by_length": [_group(len_labels[i], by_len[i], lo=cuts[i], hi=cuts[i + 1] if i + 1 < len(cuts) else None)
                          for i in keep],
            "by_depth": [_group(label, group) for label, group in zip(depth_labels, by_depth)],
            "grid": [[row[i] for i in keep] for row in grid], "predictions": records}


def format_table(results: dict) -> str:
    """The text table: overall, then one row per length bucket and per depth bucket (items, EM, F1)."""
    def row(name, group):
        em, f1 = ("-", "-") if group["em"] is None else (f"{group['em']:.1f}", f"{group['f1']:.1f}")
        return f"{name:<22}{group['items']:>7}{em:>8}{f1:>8}"

    lines = [f"{'':<22}{'items':>7}{'EM':>8}{'F1':>8}", row("overall", {**results, "bucket": "overall"})]
    lines += [row(f"length {g['bucket']}", g) for g in results["by_length"]]
    lines += [row(f"depth {g['bucket']}", g) for g in results["by_depth"]]
    if results["truncated"]:
        lines.append(f"{results['truncated']} of {results['items']} prompts were cut in the middle to "
                     f"{results.get('max_length', '--max-length')} tokens")
    return "\n".join(lines)


def plot_results(results: dict, path: str, title: str | None = None):
    """PNG: F1 and EM by context length bucket (bars); with depths, a second panel of F1 over depth x length
    (0 red -> 100 green), as the NIAH heatmap. Returns the matplotlib Figure (closed: saved, not shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups, grid = results["by_length"], results["grid"]
    panels = 2 if grid else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(groups))
    ax.bar(x - 0.2, [g["f1"] for g in groups], 0.4, label="token F1", color="tab:blue")
    ax.bar(x + 0.2, [g["em"] for g in groups], 0.4, label="exact match", color="tab:orange")
    ax.set_xticks(x, [f"{g['bucket']}\n(n={g['items']})" for g in groups], fontsize=8)
    ax.set(xlabel="prompt length (tokens, before truncation)", ylabel="score (0-100)", ylim=(0, 100))
    train = results.get("train_length")
    if train is not None and groups and (groups[-1]["hi"] is None or groups[-1]["hi"] > train):
        at = sum(g["hi"] is not None and g["hi"] <= train for g in groups) - 0.5  # between the buckets
        ax.axvline(at, color="black", linestyle="--", linewidth=1.2,
                   label=results.get("train_length_label") or f"training length {train:,}")
    ax.legend(loc="upper right", fontsize=8)
    if grid:
        heat = axes[0][1]
        values = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float)
        image = heat.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto", origin="upper")
        heat.set_xticks(range(len(groups)), [g["bucket"] for g in groups], fontsize=8)
        heat.set_yticks(range(len(results["by_depth"])), [g["bucket"] for g in results["by_depth"]])
        heat.set(xlabel="prompt length (tokens)", ylabel="gold depth")
        fig.colorbar(image, ax=heat, label="token F1")
    fig.suptitle(title or f"QA: F1 {results['f1']:.1f}, EM {results['em']:.1f} over {results['items']} questions")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
