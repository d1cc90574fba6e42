"""``megatron-lc generate`` (continue one prompt) and ``megatron-lc chat`` (a ChatML conversation on stdin).

Models and tokenizers are found as ``megatron-lc eval`` finds them: ``--model`` is an HF folder or one of our
checkpoint folders (``step_<N>/``, ``megatron_lc.checkpoint.convert.load_model``); the tokenizer is ``--tokenizer``,
else the model's own (the files of an HF folder, the recorded tokenizer of a checkpoint's training dataset), else
bytes when the model has the byte tokenizer's 260 ids, else a usage error naming ``--tokenizer``. Under torchrun,
``generate`` runs context-parallel over all ranks (ring prefill, KV cache sharded over the ranks:
``megatron_lc.parallel.sharded_generate``) and rank 0 alone prints. The completion goes to stdout, everything else
(tokenizer, timing, warnings) to stderr, so ``megatron-lc generate ... > out.txt`` holds the text alone.
docs/generate.md has the whole story.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..configtools import ConfigError


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder (config.json + safetensors) or checkpoint folder "
                                                  "step_<N>/")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model, HF tokenizer.json, a folder holding either, or 'bytes' (default: the "
                        "model's own, found as eval finds it)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32)")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_p: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default {temperature:g})")
    p.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling: keep the most likely tokens up to this mass (default {top_p:g})")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (default: a fresh one, printed so that a run can be repeated)")


def _check_sampling(args: argparse.Namespace) -> None:
    """Sampling flags in range, before the model is loaded."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature:g}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p:g}")


def _generator(args: argparse.Namespace):
    """(torch.Generator on ``args.device`` seeded with --seed or a fresh seed, a note saying how it samples)."""
    import secrets

    import torch

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    generator = torch.Generator(device=args.device).manual_seed(seed)
    if args.temperature == 0:
        return generator, "greedy (--temperature 0)"
    return generator, f"sampling at temperature {args.temperature:g}, top-p {args.top_p:g}, --seed {seed}"


def _load(args: argparse.Namespace):
    """(model, tokenizer, a note naming the tokenizer and where it came from) for ``--model``/``--tokenizer``."""
    from ..checkpoint.convert import load_model
    from ..eval.cli import model_tokenizer_for

    model = load_model(args.model, args.dtype, args.device)
    tok, tok_note = model_tokenizer_for(args, model, args.model)
    return model, tok, tok_note


# ---- generate ---------------------------------------------------------------------------------------------------
def add_generate_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue (encoded as it is: no BOS or EOS is added)")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt (read as it is)")
    _add_sampling_args(p, max_new_tokens=128, temperature=0.0, top_p=1.0)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from None
        flag = f"--prompt-file {args.prompt_file}"
    else:
        text, flag = args.prompt, "--prompt"
    if not text:
        raise ConfigError(f"{flag}: the prompt is empty; give the text the model should continue")
    return text


def run_generate(args: argparse.Namespace) -> str:
    """Print the completion of the prompt (stdout, rank 0) and return it."""
    _check_sampling(args)
    prompt = _read_prompt(args)
    from ..eval.cli import context_parallel_from_env

    with context_parallel_from_env(args, "ring") as cp:  # under torchrun: every rank one CP rank of this prompt
        return _generate(args, prompt, cp)


def _generate(args: argparse.Namespace, prompt: str, cp) -> str:
    import torch

    from ..model import generate

    model, tok, tok_note = _load(args)
    rank0 = cp is None or cp.mesh.get_rank() == 0
    note = _note if rank0 else (lambda line: None)
    ids = tok.encode(prompt)
    max_pos = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > max_pos:
        note(f"warning: the prompt's {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} go past the model's "
             f"max_position_embeddings {max_pos}: positions it never trained at")
    generator, how = _generator(args)
    note(f"{tok_note}; {how}")
    input_ids = torch.tensor([ids], dtype=torch.int64, device=args.device)
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    if cp is not None and len(ids) > cp.multiple():
        if model.config.dual_chunk_attention:
            raise ConfigError("generate under torchrun (sharded decode) does not run Dual Chunk Attention models: "
                              "run it in one process")
        from ..parallel.sharded_generate import generate_sharded

        cp.apply(model)
        out = generate_sharded(model, cp, input_ids, args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, eos_token_id=eos, generator=generator)
        where = f"context parallel over {cp.size} ranks (ring prefill, sharded KV cache)"
    else:
        out = generate(model, input_ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       eos_token_id=eos, generator=generator)
        where = "one process" if cp is None else (f"every rank on its own: a {len(ids)}-token prompt is too short "
                                                  f"to shard over {cp.size} ranks")
    seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    stopped = eos is not None and eos in new
    text = tok.decode(new[:new.index(eos)] if stopped else new)
    if rank0:
        print(text, flush=True)
    note(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s, {where}); "
         + ("stopped at EOS" if stopped else f"reached --max-new-tokens {args.max_new_tokens}"))
    return text


# ---- chat -------------------------------------------------------------------------------------------------------
def add_chat_args(p: argparse.ArgumentParser) -> None:
    from ..data.chat_template import DEFAULT_SYSTEM  # no torch: help stays fast

    _add_model_args(p)
    p.add_argument("--system", default=DEFAULT_SYSTEM,
                   help=f"the system message (default: Qwen2's {DEFAULT_SYSTEM!r}; '' for an empty one)")
    # Qwen2-Instruct's generation_config.json samples at temperature 0.7, top-p 0.8
    _add_sampling_args(p, max_new_tokens=256, temperature=0.7, top_p=0.8)


def run_chat(args: argparse.Namespace) -> int:
    """Talk with the model: a user message per line of stdin, each reply on stdout; returns the exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("chat runs in one process (it reads stdin): start it without torchrun; for a context "
                          "longer than one device holds, use megatron-lc generate under torchrun")
    _check_sampling(args)
    from ..data.chat_template import IM_END
    from ..eval.cli import resolve_device
    from .chat import ChatSession, chat_loop

    resolve_device(args)
    model, tok, tok_note = _load(args)
    generator, how = _generator(args)
    session = ChatSession(model, tok, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, generator=generator)
    ends = ", ".join(f"{tok.decode([i]) or '(EOS)'} (id {i})" for i in session.stops)
    if tok.token_to_id(IM_END) is None:
        ends += f"; the tokenizer has no {IM_END} token, so the text is cut at it"
    _note(f"chat with {args.model}: {tok_note}; {how}; a reply ends at {ends}; the conversation keeps to the "
          f"model's {session.max_positions} positions. /reset starts afresh, /quit or end of input leaves.")
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

    chat_loop(session, input, lambda text: print(text, flush=True), _note, prompt="you> " if interactive else "")
    return 0
