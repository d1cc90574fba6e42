"""``megatron-lc eval WHAT``: ``niah`` (needle in a haystack grid + heatmap), ``loss`` (loss by position and
domain, table + plot) and ``qa`` (LongBench-format or synthetic QA: greedy answers, EM and token F1 by length and
gold depth).

Models: an HF folder (config.json + safetensors) or one of our checkpoint folders (``step_<N>/``), loaded by
``megatron_lc.checkpoint.convert.load_model``. Tokenizer (``megatron_lc.data.tokenizer``): ``--tokenizer``, else
the model's own (``convert.model_tokenizer``: the files beside an HF folder, the recorded tokenizer of a
checkpoint's training dataset), else the byte tokenizer when the model's vocabulary is its 260 ids; otherwise a
usage error (bytes would score a model of another vocabulary 0 without a word). The dashed "training length" is
where the model trained (``convert.training_record``), else its max positions, labelled so. Launched by torchrun,
all three run context-parallel over all ranks, so a context that does not fit one device is still evaluated: ``eval
loss`` with ring attention, ``eval niah`` and ``eval qa`` with a ring prefill and a KV cache sharded over the ranks
(``megatron_lc.parallel.sharded_generate``). docs/eval.md has the whole story.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..configtools import ConfigError


# ---- shared -----------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def model_tokenizer_for(args, model, path: str):
    """(tokenizer, where it came from) for the model of folder ``path``: ``--tokenizer``, else the one recorded
    with the model (``model_tokenizer``), else bytes when the model's vocabulary is the byte tokenizer's; else a
    ConfigError naming --tokenizer."""
    from ..data.tokenizer import BYTE_VOCAB_SIZE, load_tokenizer

    eos = model.config.extra.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    vocab = model.config.vocab_size
    from ..checkpoint.convert import model_tokenizer

    spec, where = (args.tokenizer, "--tokenizer") if args.tokenizer is not None else model_tokenizer(path)
    if spec is None:
        if vocab != BYTE_VOCAB_SIZE:
            raise ConfigError(f"--model {path}: no tokenizer found ({where}), and its vocabulary of {vocab} ids is "
                              f"not the byte tokenizer's {BYTE_VOCAB_SIZE}: pass --tokenizer with the tokenizer it "
                              f"was trained with (a sentencepiece .model, an HF tokenizer.json, or a folder holding "
                              f"either; --tokenizer bytes if it was the byte tokenizer)")
        spec, where = "bytes", f"the byte tokenizer, whose {BYTE_VOCAB_SIZE} ids the model has ({where})"
    tok = load_tokenizer(spec, eos)
    if tok.vocab_size > vocab:
        raise ConfigError(f"the tokenizer from {where} has {tok.vocab_size} ids but the model's vocabulary has "
                          f"{vocab}: pass --tokenizer with the tokenizer the model was trained with")
    return tok, f"tokenizer {tok.name} ({tok.vocab_size:,} ids) from {where}"


def _train_length(args, path: str, model) -> tuple[int, str]:
    """(where the dashed line goes, its legend label): --train-length, else the length the model of folder ``path``
    trained at (``training_record``), else its max_position_embeddings, labelled as such."""
    if args.train_length:
        return args.train_length, f"training length {args.train_length:,} (--train-length)"
    from ..checkpoint.convert import training_record

    record = training_record(path) or {}
    if record.get("trained_seq_len"):
        n = int(record["trained_seq_len"])
        return n, f"training length {n:,}"
    n = model.config.max_position_embeddings
    return n, f"max positions {n:,} (training length not recorded)"


def _model_names(paths: list[str]) -> list[str]:
    """Distinct display names of ``--model`` folders: the folder name, with as many parent folders as it takes to
    tell apart folders of the same name (runs/a/hf, runs/b/hf -> a/hf, b/hf)."""
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    if len({tuple(p) for p in parts}) < len(paths):
        raise ConfigError(f"--model {paths}: the same folder is given twice; give each model once")
    depth = 1
    while len({tuple(p[-depth:]) for p in parts}) < len(paths):
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _json_dict(text: str) -> dict | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}; e.g. "
                                         "'{\"rope_type\": \"yarn\", \"factor\": 4.0}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"want a JSON object, got {text!r}")
    return value


def position_overrides(args: argparse.Namespace) -> dict:
    """ModelConfig fields the position flags set (only the flags given)."""
    out = {}
    if args.rope_theta is not None:
        out["rope_theta"] = args.rope_theta
    if args.rope_scaling is not False:
        out["rope_scaling"] = args.rope_scaling
    if args.dual_chunk_attention is not False:
        out["dual_chunk_attention"] = args.dual_chunk_attention
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, action="append",
                   help="HF folder or checkpoint folder step_<N>/ (eval loss: repeat to compare models)")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model, HF tokenizer.json, a folder holding either, or 'bytes' (default: the "
                        "model's own: the tokenizer files of an HF folder, the recorded tokenizer of a checkpoint's "
                        "training dataset; else bytes if the model has the byte tokenizer's 260 ids)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32)")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--train-length", type=int, default=None,
                   help="where the dashed line goes (default: the data.seq_len the model trained at, recorded in "
                        "its checkpoint or the training.json of its HF folder; else max_position_embeddings)")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--rope-theta", type=float, default=None, help="override the model's RoPE base")
    p.add_argument("--rope-scaling", type=_json_dict, default=False, metavar="JSON",
                   help="override rope_scaling, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 32768}' (none: plain RoPE)")
    p.add_argument("--dual-chunk-attention", type=_json_dict, default=False, metavar="JSON",
                   help="override Dual Chunk Attention, e.g. '{\"chunk_size\": 32768, \"local_size\": 1024}' "
                        "(none: off)")


def resolve_device(args: argparse.Namespace) -> None:
    """Set ``args.device`` when --device was not given: cuda if there is one, else cpu (resolved at run time, not as
    the flag's default, so --help imports no torch)."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def context_parallel_from_env(args: argparse.Namespace, mode: str) -> Iterator:
    """For a ``with`` block: under torchrun (WORLD_SIZE > 1) every rank is one CP rank of one sequence, and the
    block gets a ContextParallel over all ranks; one process: None. The process group it opens ends with the block
    (``distributed.process_group``: after a barrier, or at once when the block raised). Resolves ``args.device``,
    per rank on CUDA."""
    resolve_device(args)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    import torch
    import torch.distributed as dist

    from ..distributed import process_group
    from ..parallel.context_parallel import ContextParallel
    from ..parallel.parallel_dims import ParallelDims

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    with process_group(device_type):  # on cuda: LOCAL_RANK's device becomes current
        if device_type == "cuda":
            args.device = f"cuda:{torch.cuda.current_device()}"
        world = dist.get_world_size()
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=world, tp=1, world_size=world)
        dims.build_mesh(device_type)
        yield ContextParallel(dims.get_mesh("cp"), mode=mode)


# ---- niah -------------------------------------------------------------------------------------------------------
def add_niah_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--variant", default="value", choices=("value", "original"),
                   help="value: 'The special magic {city} number is: NNNNNNN.' (exact match); original: Kamradt's "
                        "San Francisco needle (default value)")
    p.add_argument("--scoring", default=None, choices=("exact", "regex", "recall"),
                   help="exact match, regex (original: sandwich.+?dolores.+?sunny) or word recall "
                        "(default: exact for value, regex for original)")
    p.add_argument("--haystack", default=None,
                   help="text file, or a .bin/.idx token dataset (megatron_lc.data.indexed); default: the stdlib's docstrings")
    p.add_argument("--lengths", type=_int_list, default=None,
                   help="context lengths in tokens, comma-separated (default: --num-lengths evenly spaced up to "
                        "--max-length)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest context when --lengths is not given (default: 2 x the training length)")
    p.add_argument("--num-lengths", type=int, default=8, help="lengths when --lengths is not given (default 8)")
    p.add_argument("--depths", type=_float_list, default=[float(d) for d in range(0, 101, 10)],
                   help="needle depths in percent, comma-separated (default 0,10,...,100)")
    p.add_argument("--trials", type=int, default=1, help="needles per cell (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    p.add_argument("--question-reserve", type=int, default=None,
                   help="tokens reserved after the haystack for question and answer (Kamradt: 200); default: "
                        "exactly the question plus --max-new-tokens, so prompt + answer = the context length")


def run_niah(args: argparse.Namespace) -> dict:
    from . import niah

    if len(args.model) != 1:
        raise ConfigError(f"eval niah takes one --model, got {len(args.model)}")
    for flag, value in {"--trials": args.trials, "--num-lengths": args.num_lengths,
                        "--max-new-tokens": args.max_new_tokens}.items():
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    from ..checkpoint.convert import load_model

    with context_parallel_from_env(args, "ring") as cp:
        model = load_model(args.model[0], args.dtype, args.device, position_overrides(args))
        tok, tok_note = model_tokenizer_for(args, model, args.model[0])
        if cp is None:
            answer_fn = niah.model_answer_fn(model, tok, args.max_new_tokens)
        else:  # ring prefill, then decode over each rank's shard of the KV cache
            if model.config.dual_chunk_attention:
                raise ConfigError("eval niah under torchrun (sharded decode) does not run Dual Chunk Attention models: run "
                                  "it in one process")
            cp.apply(model)
            answer_fn = niah.sharded_answer_fn(model, cp, tok, args.max_new_tokens)
        rank0 = cp is None or cp.mesh.get_rank() == 0
        log = (lambda line: print(line, flush=True)) if rank0 else (lambda line: None)
        log(tok_note)
        train_length, train_label = _train_length(args, args.model[0], model)
        if args.lengths:
            lengths = args.lengths
        else:
            top = args.max_length or 2 * train_length
            lengths = [round(top * (i + 1) / args.num_lengths) for i in range(args.num_lengths)]
        lengths, depths = niah.parse_grid(lengths, args.depths)
        t0 = time.perf_counter()
        haystack = niah.load_haystack(args.haystack, tok, model.config.vocab_size)
        log(f"haystack: {len(haystack):,} tokens ({args.haystack or 'stdlib docstrings'}); grid {len(lengths)} lengths "
            f"x {len(depths)} depths x {args.trials} trials; context parallel {cp.size if cp else 1} "
            f"[{time.perf_counter() - t0:.1f} s]")
        results = niah.run_grid(answer_fn, tok, haystack, lengths, depths, variant=args.variant, scoring=args.scoring,
                                trials=args.trials, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                question_reserve=args.question_reserve, progress=log)
        results.update(model=args.model[0], train_length=train_length, train_length_label=train_label,
                       tokenizer=tok_note, cp=cp.size if cp else 1,
                       rope={"rope_theta": model.config.rope_theta, "rope_scaling": model.config.rope_scaling,
                             "dual_chunk_attention": model.config.dual_chunk_attention})
        if rank0:  # every rank holds the same results: one writes them
            os.makedirs(args.out, exist_ok=True)
            json_path, png_path = os.path.join(args.out, "niah.json"), os.path.join(args.out, "niah.png")
            niah.write_json(results, json_path)
            niah.plot_heatmap(results, png_path, train_length, train_label=train_label)
            print(_niah_table(results))
            print(f"mean score {results['overall']:.3f} [{time.perf_counter() - t0:.1f} s]")
            print(f"wrote {json_path} and {png_path}")
    return results


def _niah_table(results: dict) -> str:
    lengths = results["lengths"]
    lines = ["depth \\ length " + "".join(f"{n:>8}" for n in lengths)]
    for d, row in zip(results["depths"], results["mean"]):
        lines.append(f"{d:>14g}% " + "".join("       -" if v is None else f"{v:8.2f}" for v in row))
    return "\n".join(lines)


# ---- loss -------------------------------------------------------------------------------------------------------
def add_loss_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--data", action="append", default=None, metavar="DOMAIN=PATH",
                   help="a domain's text file, or token dataset (its PREFIX as train's data.train_tokens, or its "
                        ".bin/.idx file); repeat per domain (default: stdlib docstrings as 'docstrings' and stdlib "
                        "source as 'code')")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per evaluated sequence (default: the model's max_position_embeddings)")
    p.add_argument("--bucket-size", type=int, default=None,
                   help="tokens per position bucket (default: 4096 when --seq-len >= 32K, else --seq-len / 8)")
    p.add_argument("--samples", type=int, default=4, help="sequences per domain (default 4)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="tokens per lm_head chunk (default 2048)")
    p.add_argument("--cp-mode", default="ring", choices=("ring", "allgather", "ulysses"),
                   help="context-parallel attention under torchrun (default ring)")


def _domain_paths(args) -> dict[str, str]:
    """{domain: path} of the --data flags (checked before any model is loaded)."""
    out = {}
    for item in args.data or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--data {item!r}: use DOMAIN=PATH, e.g. --data book=pg19.txt or --data "
                              f"code=work/tokens (a dataset prefix)")
        if name in out:
            raise ConfigError(f"--data {item!r}: domain {name!r} is given twice; name each domain once")
        out[name] = path
    return out


def _needs_tokenizer(args) -> bool:
    """Whether some domain is text to encode (token datasets are scored as they are)."""
    from .niah import is_dataset

    return not args.data or not all(is_dataset(p) for p in _domain_paths(args).values())


def _domains(args, tok, vocab_size: int) -> dict[str, list[int]]:
    """{domain: token ids} of --data (``tok`` None: every domain is a token dataset), or of the stdlib texts."""
    from .niah import load_haystack

    if not args.data:
        from ..data.stdlib_text import stdlib_code_text, stdlib_docstring_text

        return {"docstrings": tok.encode(stdlib_docstring_text()), "code": tok.encode(stdlib_code_text())}
    return {name: load_haystack(path, tok, vocab_size, flag="--data")
            for name, path in _domain_paths(args).items()}


def run_loss(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from ..checkpoint.convert import load_model
    from . import loss_by_length as lbl

    for flag, value in {"--samples": args.samples, "--batch-size": args.batch_size,
                        "--chunk-tokens": args.chunk_tokens}.items():
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    names = _model_names(args.model)
    _domain_paths(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with context_parallel_from_env(args, args.cp_mode) as cp:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        t0 = time.perf_counter()
        results, edges, train, cached = {}, None, None, None
        for path, model_name in zip(args.model, names):
            model = load_model(path, args.dtype, args.device, position_overrides(args))
            tok = None
            if _needs_tokenizer(args):
                tok, tok_note = model_tokenizer_for(args, model, path)
                if rank0:
                    print(f"{path}: {tok_note}", flush=True)
            seq_len = args.seq_len or model.config.max_position_embeddings
            bucket = args.bucket_size or (4096 if seq_len >= 32768 else max(1, seq_len // 8))
            model_edges = lbl.bucket_edges(seq_len, bucket)
            if edges is not None and model_edges != edges:
                raise ConfigError(f"models differ in max_position_embeddings; pass --seq-len to compare {args.model}")
            edges = model_edges
            train = train or _train_length(args, path, model)  # the first model's
            if cp is not None:
                cp.apply(model)
            # Models sharing a tokenizer are scored on the same tokens: encode the domains once per tokenizer.
            key = (model.config.vocab_size, None if tok is None else (type(tok).__name__, tok.name, tok.vocab_size))
            if cached is None or cached[0] != key:
                cached = (key, _domains(args, tok, model.config.vocab_size))
            domains = cached[1]
            results[model_name] = per_domain = {}
            for name, tokens in domains.items():
                windows = lbl.windows_from_tokens(tokens, seq_len, args.samples, name)
                per_domain[name] = lbl.loss_by_position(model, windows, bucket, cp, args.batch_size, args.chunk_tokens)
                if rank0:
                    print(f"{path}: {name}: {args.samples} x {seq_len} tokens, loss {per_domain[name].average():.4f} "
                          f"[{time.perf_counter() - t0:.1f} s]", flush=True)
        train_length, train_label = train
        out = lbl.results_to_json(results, edges)
        out.update(seq_len=edges[-1], cp=world, train_length=train_length, train_length_label=train_label,
                   model_paths=dict(zip(names, args.model)))
        if rank0:
            os.makedirs(args.out, exist_ok=True)
            json_path, png_path = os.path.join(args.out, "loss_by_length.json"), os.path.join(args.out, "loss_by_length.png")
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)
            lbl.plot_loss(results, edges, png_path, train_length if train_length < edges[-1] else None, train_label)
            print(lbl.format_table(results, edges))
            print(f"wrote {json_path} and {png_path}")
        out["table"] = lbl.format_table(results, edges)
    return out


# ---- qa ---------------------------------------------------------------------------------------------------------
def add_qa_args(p: argparse.ArgumentParser) -> None:
    from ..data.chat_template import DEFAULT_SYSTEM  # no torch: help stays fast
    from .qa import TEMPLATES

    _add_common(p)
    p.add_argument("--data", action="append", required=True, metavar="JSONL",
                   help="questions: LongBench-format JSONL (input, context, answers[, length, _id]) or the output "
                        "of megatron-lc data synth-qa (messages, qa, meta); repeat for more files")
    p.add_argument("--template", default="multi-doc",
                   help=f"LongBench prompt: {' or '.join(sorted(TEMPLATES))} (LongBench's hotpotqa/2wikimqa/musique "
                        "and multifieldqa_en prompts), or a text holding {context} and {input} (default multi-doc)")
    p.add_argument("--no-chat", action="store_true",
                   help="send LongBench prompts as raw text (base models), not as a ChatML user turn")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", default=DEFAULT_SYSTEM,
                        help=f"system message put first when a chat has none (default: Qwen2's {DEFAULT_SYSTEM!r}, "
                             "as data sft adds it)")
    system.add_argument("--no-default-system", action="store_true", help="add no system message")
    p.add_argument("--max-length", type=int, default=None,
                   help="most prompt tokens; longer prompts keep their first and last halves (default: the model's "
                        "max_position_embeddings minus --max-new-tokens)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="greedy tokens per answer; it ends earlier at <|im_end|> or EOS (default 32, LongBench's "
                        "for multi-doc QA)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions (default: all)")
    p.add_argument("--drop-gold", action="store_true",
                   help="synth-qa chats: ask each question with its gold documents taken out of the context (the "
                        "no-evidence control: a model that reads the context scores near zero)")
    p.add_argument("--length-buckets", type=_int_list, default=None,
                   help="prompt-length bucket edges in tokens, e.g. 4000,8000 for LongBench-E's 0-4K, 4-8K, 8K+ "
                        "(default: powers of two)")
    p.add_argument("--depth-buckets", type=int, default=5,
                   help="gold-depth buckets over [0, 1] for synthetic QA (default 5: fifths)")


def run_qa(args: argparse.Namespace) -> dict:
    from . import qa

    if len(args.model) != 1:
        raise ConfigError(f"eval qa takes one --model, got {len(args.model)}")
    for flag, value in {"--max-new-tokens": args.max_new_tokens, "--depth-buckets": args.depth_buckets,
                        "--limit": args.limit}.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length must be >= 2 (a first and a last half), got {args.max_length}")
    qa.length_edges([1], args.length_buckets)  # a bad --length-buckets fails before the model loads
    items = qa.read_items(args.data, qa.resolve_template(args.template), args.drop_gold)[:args.limit]
    qa.check_prompts(items, not args.no_chat, None if args.no_default_system else args.system)
    with context_parallel_from_env(args, "ring") as cp:
        return _run_qa(args, items, cp)


def _run_qa(args: argparse.Namespace, items: list, cp) -> dict:
    from ..checkpoint.convert import load_model
    from ..data.chat_template import IM_END, stop_tokens
    from . import qa

    model = load_model(args.model[0], args.dtype, args.device, position_overrides(args))
    tok, tok_note = model_tokenizer_for(args, model, args.model[0])
    rank0 = cp is None or cp.mesh.get_rank() == 0
    log = (lambda line: print(line, flush=True)) if rank0 else (lambda line: None)
    max_pos = model.config.max_position_embeddings
    max_length = args.max_length or max_pos - args.max_new_tokens
    if max_length < 2:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                          f"{max_pos} positions: give fewer, or --max-length")
    system = None if args.no_default_system else args.system
    log(tok_note)
    if max_length + args.max_new_tokens > max_pos:
        log(f"warning: --max-length {max_length} + --max-new-tokens {args.max_new_tokens} go past the model's "
            f"max_position_embeddings {max_pos}: long prompts reach positions it never trained at")
    if tok.token_to_id(IM_END) is None:
        log(f"note: the tokenizer has no {IM_END} token: ChatML markers are encoded as text, and an answer ends at "
            f"EOS or where it writes a marker")
    forms = ", ".join(f"{n} {form}" for form, n in sorted(Counter(i.form for i in items).items()))
    log(f"{len(items)} questions ({forms}) from {', '.join(args.data)}; prompts over {max_length} tokens are cut "
        f"in the middle; answers up to {args.max_new_tokens} tokens; context parallel {cp.size if cp else 1}")
    if args.no_chat and any(i.messages is not None for i in items):
        log("note: --no-chat applies to LongBench records; synthetic chats are sent as ChatML, as they trained")
    t0 = time.perf_counter()
    generate_fn = qa.model_generate_fn(model, stop_tokens(tok), args.max_new_tokens, cp)
    records = qa.run_items(items, tok, generate_fn, max_length, chat=not args.no_chat, system=system, progress=log)
    results = qa.summarize(records, args.length_buckets, args.depth_buckets)
    train_length, train_label = _train_length(args, args.model[0], model)
    results.update(model=args.model[0], data=args.data, drop_gold=args.drop_gold, template=args.template,
                   chat=not args.no_chat, system=system, max_length=max_length, max_new_tokens=args.max_new_tokens,
                   tokenizer=tok_note, cp=cp.size if cp else 1, train_length=train_length,
                   train_length_label=train_label, seconds=round(time.perf_counter() - t0, 2))
    if rank0:  # every rank holds the same answers: one writes them
        os.makedirs(args.out, exist_ok=True)
        json_path, png_path = os.path.join(args.out, "qa_results.json"), os.path.join(args.out, "qa_results.png")
        from ..files import write_json

        write_json(json_path, results)
        qa.plot_results(results, png_path)
        print(qa.format_table(results))
        print(f"F1 {results['f1']:.1f}, EM {results['em']:.1f} over {len(items)} questions "
              f"[{results['seconds']:.1f} s]")
        print(f"wrote {json_path} and {png_path}")
    return results


# ---- the command ------------------------------------------------------------------------------------------------
def add_eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    niah = sub.add_parser("niah", help="needle in a haystack over lengths x depths: JSON results and a heatmap PNG",
                          description="Needle in a haystack: hide a needle at each depth of haystacks of each "
                                      "length, decode greedily, score; write niah.json and niah.png.")
    add_niah_args(niah)
    loss = sub.add_parser("loss", help="validation loss by position bucket and domain: table (Fu et al. Table 5) "
                                       "and PNG; context-parallel under torchrun",
                          description="Validation loss by position bucket and domain; write loss_by_length.json "
                                      "and loss_by_length.png and print the table.")
    add_loss_args(loss)
    qa = sub.add_parser("qa", help="long-context QA (LongBench-format or synth-qa JSONL): greedy answers, exact "
                                   "match and token F1 by length and gold depth; JSON, table and PNG",
                        description="Answer each question greedily (KV cache; context-parallel under torchrun), "
                                    "score exact match and LongBench's token F1, and write qa_results.json and "
                                    "qa_results.png by prompt length and gold depth.")
    add_qa_args(qa)


def run_eval(args: argparse.Namespace):
    if args.what == "niah":
        return run_niah(args)
    if args.what == "qa":
        return run_qa(args)
    return run_loss(args)
