"""``megatron-lc demo``: train the ``demo`` preset (~3M parameters) on CPU for a few minutes, then generate.

The text is the docstrings of the Python standard library, so nothing is downloaded; tokens are raw UTF-8 bytes.
The loop is deliberately plain (one process, fp32, AdamW, warmup + cosine, grad clipping): it shows the model,
the aligned-label loss and generation working end to end, not the trainer of later issues.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
import tokenize
import warnings
from collections.abc import Iterable

import torch

from .configtools import ConfigError
from .model import Transformer, generate, preset_config, save_hf


class ByteTokenizer:
    """Demo-only tokenizer: token id = UTF-8 byte value (0..255), plus special ids 256..258.

    The real tokenizers (HF tokenizer files) come with the data pipeline; this exists so the demo needs nothing.
    """

    BOS = 256
    EOS = 257  # also the document separator in packed training text
    PAD = 258
    vocab_size = 260  # the demo preset's embedding rows; id 259 is unused

    def encode(self, text: str) -> list[int]:
        """str -> byte ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """ids (ints or a 1-D tensor) -> str; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in (int(t) for t in ids) if 0 <= i < 256).decode("utf-8", errors="replace")


# ---- corpus -----------------------------------------------------------------------------------------------------
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files() -> list[str]:
    """Paths of the standard library's .py files outside test/idle/site-packages folders, in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    # Sort by the path relative to the root with "/" separators, so the order does not depend on the OS walk.
    return sorted(paths, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def build_corpus(max_bytes: int = 8 * 2**20) -> list[str]:
    """Module/class/function docstrings of the standard library, as a list of documents (str).

    Files are read in sorted order and documents taken until their UTF-8 size would pass ``max_bytes``, so the
    same Python gives the same list. Exact duplicates are dropped (boilerplate such as the codec modules' would
    otherwise appear in both the train and the validation split). Files that fail to read or parse are skipped.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in stdlib_files():
        try:
            with tokenize.open(path) as f:  # honours a file's coding cookie
                source = f.read()
            with warnings.catch_warnings():  # e.g. SyntaxWarning for invalid escapes in old modules
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOC_NODES):
                continue
            doc = ast.get_docstring(node)
            if not doc or doc in seen:
                continue
            size = len(doc.encode("utf-8"))
            if total + size > max_bytes:
                return docs
            seen.add(doc)
            docs.append(doc)
            total += size
    if not docs:
        raise RuntimeError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}: this Python ships no "
                           f".py sources for its standard library, so the demo has no text to train on")
    return docs


def pack(docs: list[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    """Documents -> one int64 tensor ``[N]`` of byte ids, each document followed by EOS."""
    eos = torch.tensor([tokenizer.EOS], dtype=torch.int64)
    parts = []
    for doc in docs:
        parts.append(torch.frombuffer(bytearray(doc.encode("utf-8")), dtype=torch.uint8).to(torch.int64))
        parts.append(eos)
    return torch.cat(parts)


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens of ``tokens [N]`` -> (input_ids, labels), each ``[B, S]`` int64.

    labels are aligned (``labels[:, t]`` is the target of position t): the model never shifts.
    """
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]  # [B, S+1]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """The first ``n`` consecutive windows of ``seq_len + 1`` tokens of ``tokens [N]``, as ``[n, S+1]`` int64
    (adjacent windows share one token, so every token but the first is a target once)."""
    n = min(n, (len(tokens) - 1) // seq_len)
    return torch.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats per byte) over every target of ``windows [n, S+1]``."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for chunk in windows.split(batch_size):
        s, c = model(chunk[:, :-1], labels=chunk[:, 1:], reduction="sum")
        loss_sum += float(s)
        count += int(c)
    model.train(was_training)
    return loss_sum / count


# ---- optimisation -----------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with decay on matrices only: norms and biases (dim < 2) are not pulled towards zero."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied lm_head/embed appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate of 0-based ``step``: linear warmup to ``peak`` over ``warmup`` steps, then cosine down to
    ``floor * peak`` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- CLI --------------------------------------------------------------------------------------------------------
# 400 steps of 16 x 256 tokens: ~0.48 s/step, 3:17-3:25 for the whole job on 2 CPU cores (torch 2.13, fp32).
DEFAULT_STEPS = 400
DEFAULT_PROMPTS = ("Return the ", "The ", "If ")


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``megatron-lc demo``."""
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps (default {DEFAULT_STEPS}: about 4 minutes on 2 CPU cores)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens (bytes) per training window (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the batches and sampling (default 0)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop training after this many minutes of wall time, even before --steps "
                             "(the LR schedule still spans --steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (default 50)")
    parser.add_argument("--eval-windows", type=int, default=32,
                        help="fixed validation windows of --seq-len bytes (default 32)")
    parser.add_argument("--corpus-mb", type=float, default=8.0,
                        help="cap on the docstring corpus in MB (default 8; the stdlib has less, ~2 MB)")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"prompt to continue after training; repeat for several "
                             f"(default: {', '.join(repr(p) for p in DEFAULT_PROMPTS)})")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate per prompt (default 200)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature (default 0.7, seeded by --seed); 0 decodes greedily, which a "
                             "model this small turns into loops")
    parser.add_argument("--out", default=None,
                        help="folder for the final model (HF format, load with megatron_lc.model.load_hf) and "
                             "metrics.jsonl")


def _check_args(args: argparse.Namespace) -> None:
    """Raise ConfigError naming the flag for values the demo cannot run with."""
    positive = {"--steps": args.steps, "--seq-len": args.seq_len, "--batch-size": args.batch_size,
                "--eval-every": args.eval_every, "--eval-windows": args.eval_windows}
    for flag, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    for flag, value in {"--lr": args.lr, "--corpus-mb": args.corpus_mb}.items():
        if not value > 0:  # also rejects NaN
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if args.minutes is not None and not args.minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.prompt is not None and any(p == "" for p in args.prompt):
        raise ConfigError("--prompt must not be empty")


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """One status line rewritten in place on a terminal; every ``every``-th update printed as a line otherwise."""

    def __init__(self, every: int, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self.width = 0  # length of the line now on screen (terminal only)

    def update(self, step: int, line: str, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
        elif force or step % self.every == 0:
            print(line, file=self.stream, flush=True)

    def message(self, line: str) -> None:
        """A line of its own (validation loss, notes), kept above the status line."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0
        print(line, file=self.stream, flush=True)


def generate_samples(model: Transformer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> dict[str, str]:
    """Continue each prompt (greedy at temperature 0) until EOS or ``max_new_tokens`` bytes; print and return
    ``{prompt: text}``, the text including its prompt."""
    tok = ByteTokenizer()
    mode = "greedy" if temperature == 0 else f"temperature {temperature:g}"
    hint = ": a model this small repeats itself when greedy" if temperature == 0 else ":"
    print(f"\ngenerating ({mode}, up to {max_new_tokens} bytes, stops at end of docstring){hint}")
    gen = torch.Generator().manual_seed(seed)
    samples = {}
    for prompt in prompts:
        # Documents follow an EOS in the packed training text, so EOS + prompt reads as "a docstring starts".
        ids = torch.tensor([[tok.EOS] + tok.encode(prompt)])
        out = generate(model, ids, max_new_tokens, temperature=temperature, eos_token_id=tok.EOS, generator=gen)
        samples[prompt] = tok.decode(out[0])
        print(f"--- {prompt!r}\n{samples[prompt]}")
    return samples


def run_demo(args: argparse.Namespace) -> dict:
    """Train the demo preset on stdlib docstrings, evaluate, generate; print progress to stdout.

    ``args`` holds the fields of ``add_demo_args``. Returns a dict: ``initial_val_loss``, ``final_val_loss``
    (nats per byte), ``val_losses`` [(step, loss)], ``steps`` (done), ``planned_steps``, ``stopped_early``,
    ``tokens_per_s`` (training tokens over training time, evaluation excluded), ``train_seconds``,
    ``samples`` {prompt: generated text including the prompt}, and ``model`` (the trained Transformer, fp32).
    """
    _check_args(args)
    tok = ByteTokenizer()
    t0 = time.perf_counter()

    docs = build_corpus(int(args.corpus_mb * 1e6))
    if len(docs) < 2:
        raise ConfigError(f"--corpus-mb {args.corpus_mb} holds {len(docs)} docstring(s); need at least 2 "
                          f"(one for training, one for validation)")
    # Validation = the last 2% of documents: whole modules the model never trained on, chosen deterministically.
    n_val = max(1, round(0.02 * len(docs)))
    train_tokens, val_tokens = pack(docs[:-n_val], tok), pack(docs[-n_val:], tok)
    if len(train_tokens) <= args.seq_len or len(val_tokens) <= args.seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than the text: {len(train_tokens):,} training and "
                          f"{len(val_tokens):,} validation bytes; lower --seq-len or raise --corpus-mb")
    val = eval_windows(val_tokens, args.seq_len, args.eval_windows)
    print(f"corpus: {len(docs):,} stdlib docstrings, {len(train_tokens):,} training bytes, "
          f"{len(val_tokens):,} validation bytes ({n_val} documents; {len(val)} windows of {args.seq_len} evaluated) "
          f"[{time.perf_counter() - t0:.1f} s]")

    # The byte ids of the specials go into config.json, so a saved folder says how to read its vocabulary.
    config = dataclasses.replace(preset_config("demo"),
                                 extra={"bos_token_id": tok.BOS, "eos_token_id": tok.EOS, "pad_token_id": tok.PAD})
    model = Transformer(config, seed=args.seed).float().train()
    optimizer = make_optimizer(model, args.lr)
    warmup = max(1, round(0.05 * args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    print(f"model: demo preset, {config.num_params():,} parameters, fp32, {torch.get_num_threads()} threads; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g} "
          f"(warmup {warmup}, cosine to {0.1 * args.lr:g})"
          + (f", stopping after {args.minutes:g} min" if args.minutes else ""))

    with contextlib.ExitStack() as stack:  # closes metrics.jsonl however the run ends
        metrics = None
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            metrics = stack.enter_context(open(os.path.join(args.out, "metrics.jsonl"), "w"))

        def log(record: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()

        progress = _Progress(every=max(1, args.steps // 20))
        width = len(str(args.steps))
        val_losses = [(0, evaluate(model, val, args.batch_size))]
        progress.message(f"step {0:>{width}}/{args.steps}  val loss {val_losses[0][1]:.4f}  "
                         f"(uniform over {config.vocab_size} ids: {math.log(config.vocab_size):.4f})")
        log({"kind": "eval", "step": 0, "val_loss": val_losses[0][1]})

        ema = ema_weight = 0.0
        step = 0
        train_seconds = 0.0
        stopped_early = False
        start = time.perf_counter()
        while step < args.steps:
            t_step = time.perf_counter()
            lr = lr_at(step, args.steps, args.lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            input_ids, labels = sample_batch(train_tokens, args.batch_size, args.seq_len, gen)
            loss = model(input_ids, labels=labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            step += 1
            train_seconds += time.perf_counter() - t_step

            loss_value = loss.detach().item()
            ema, ema_weight = 0.9 * ema + 0.1 * loss_value, 0.9 * ema_weight + 0.1
            elapsed = time.perf_counter() - start
            tps = step * tokens_per_step / train_seconds
            # ETA from the elapsed time per step so far (evaluations included), capped by --minutes.
            eta = elapsed / step * (args.steps - step)
            if args.minutes:
                eta = min(eta, max(0.0, args.minutes * 60 - elapsed))
            progress.update(step, f"step {step:>{width}}/{args.steps}  "
                                  f"loss {ema / ema_weight:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
                                  f"elapsed {_clock(elapsed)}  eta {_clock(eta)}")
            log({"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": tps, "elapsed_s": elapsed})

            out_of_time = args.minutes is not None and elapsed >= args.minutes * 60
            if step % args.eval_every == 0 or step == args.steps or out_of_time:
                val_losses.append((step, evaluate(model, val, args.batch_size)))
                progress.message(f"step {step:>{width}}/{args.steps}  val loss {val_losses[-1][1]:.4f}")
                log({"kind": "eval", "step": step, "val_loss": val_losses[-1][1]})
            if out_of_time and step < args.steps:
                stopped_early = True
                progress.message(f"stopped at step {step}/{args.steps}: --minutes {args.minutes:g} reached")
                break
        progress.message(f"trained {step} steps in {_clock(time.perf_counter() - start)}: "
                         f"val loss {val_losses[0][1]:.4f} -> {val_losses[-1][1]:.4f} nats/byte "
                         f"({val_losses[-1][1] / math.log(2):.2f} bits/byte), "
                         f"{step * tokens_per_step / train_seconds:,.0f} tok/s")

        samples = generate_samples(model.eval(), args.prompt or list(DEFAULT_PROMPTS), args.max_new_tokens,
                                   args.temperature, args.seed)

        if args.out:
            save_hf(model, args.out)
            print(f"\nsaved the model (HF format) and metrics.jsonl to {args.out}")
        log({"kind": "final", "steps": step, "initial_val_loss": val_losses[0][1],
             "final_val_loss": val_losses[-1][1], "tokens_per_s": step * tokens_per_step / train_seconds})

    return {
        "initial_val_loss": val_losses[0][1],
        "final_val_loss": val_losses[-1][1],
        "val_losses": val_losses,
        "steps": step,
        "planned_steps": args.steps,
        "stopped_early": stopped_early,
        "tokens_per_s": step * tokens_per_step / train_seconds,
        "train_seconds": train_seconds,
        "samples": samples,
        "model": model,
    }
