"""``megatron-lc demo``: train the ``demo`` preset (~3M parameters) on CPU for a few minutes, then generate.

The text is the docstrings of the Python standard library (megatron_lc.data.stdlib_text), so nothing is
downloaded; tokens are raw UTF-8 bytes (megatron_lc.data.tokenizer.Bytes). The loop is deliberately plain (one
process, fp32, gradient clipping) around the trainer's parts: AdamW and the warmup + cosine schedule of
megatron_lc.train.optim, the progress line and JSONL log of megatron_lc.train.metrics. It shows the model, the
aligned-label loss and generation working end to end; ``megatron-lc train`` is the distributed trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch

from .configtools import ConfigError
from .data.stdlib_text import stdlib_docstrings
from .data.tokenizer import Bytes
from .eval.loss_by_length import windows_from_tokens
from .model import Transformer, generate, preset_config, save_hf
from .train.config import OptimSection, ScheduleSection
from .train.metrics import MetricsLogger, Progress
from .train.optim import build_optimizer, build_scheduler


def pack(docs: list[str], tokenizer: Bytes) -> torch.Tensor:
    """Documents -> one int64 tensor ``[N]`` of byte ids, each document followed by EOS."""
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int64)
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
                             "metrics.jsonl (the trainer's record format; replaced on each run)")


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


def generate_samples(model: Transformer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> dict[str, str]:
    """Continue each prompt (greedy at temperature 0) until EOS or ``max_new_tokens`` bytes; print and return
    ``{prompt: text}``, the text including its prompt."""
    tok = Bytes()
    mode = "greedy" if temperature == 0 else f"temperature {temperature:g}"
    hint = ": a model this small repeats itself when greedy" if temperature == 0 else ":"
    print(f"\ngenerating ({mode}, up to {max_new_tokens} bytes, stops at end of docstring){hint}")
    gen = torch.Generator().manual_seed(seed)
    samples = {}
    for prompt in prompts:
        # Documents follow an EOS in the packed training text, so EOS + prompt reads as "a docstring starts".
        ids = torch.tensor([[tok.eos_token_id] + tok.encode(prompt)])
        out = generate(model, ids, max_new_tokens, temperature=temperature, eos_token_id=tok.eos_token_id,
                       generator=gen)
        samples[prompt] = tok.decode(out[0])
        print(f"--- {prompt!r}\n{samples[prompt]}")
    return samples


def _split_corpus(args: argparse.Namespace, tok: Bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The stdlib docstrings packed as training bytes ``[N]`` and validation windows ``[n, S+1]`` (int64)."""
    t0 = time.perf_counter()
    docs = stdlib_docstrings(int(args.corpus_mb * 1e6))
    if len(docs) < 2:
        raise ConfigError(f"--corpus-mb {args.corpus_mb} holds {len(docs)} docstring(s); need at least 2 "
                          f"(one for training, one for validation)")
    # Validation = the last 2% of documents: whole modules the model never trained on, chosen deterministically.
    n_val = max(1, round(0.02 * len(docs)))
    train_tokens, val_tokens = pack(docs[:-n_val], tok), pack(docs[-n_val:], tok)
    if len(train_tokens) <= args.seq_len or len(val_tokens) <= args.seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than the text: {len(train_tokens):,} training and "
                          f"{len(val_tokens):,} validation bytes; lower --seq-len or raise --corpus-mb")
    # Consecutive windows from the start of the validation text, as many as it holds up to --eval-windows.
    val = windows_from_tokens(val_tokens, args.seq_len, min(args.eval_windows, (len(val_tokens) - 1) // args.seq_len))
    print(f"corpus: {len(docs):,} stdlib docstrings, {len(train_tokens):,} training bytes, "
          f"{len(val_tokens):,} validation bytes ({n_val} documents; {len(val)} windows of {args.seq_len} evaluated) "
          f"[{time.perf_counter() - t0:.1f} s]")
    return train_tokens, val


def _open_log(args: argparse.Namespace, stack: contextlib.ExitStack):
    """``log(step, metrics)`` writing ``--out``/metrics.jsonl (a fresh file per run), or doing nothing."""
    if not args.out:
        return lambda step, metrics: None
    path = os.path.join(args.out, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)  # MetricsLogger appends (for resumed runs); a demo run starts its log anew
    return stack.enter_context(MetricsLogger(args.out, rank=0, tensorboard=False)).log


def _train(args: argparse.Namespace, model: Transformer, train_tokens: torch.Tensor, val: torch.Tensor,
           log) -> dict:
    """The training loop: AdamW + warmup/cosine, clipping at 1.0, evaluation every ``--eval-every`` steps, a stop
    at ``--minutes``. Returns the run's numbers (the keys of run_demo's result except samples and model)."""
    warmup = max(1, round(0.05 * args.steps))
    optimizer = build_optimizer(model, OptimSection(lr=args.lr, weight_decay=0.1))
    scheduler = build_scheduler(optimizer, args.steps,
                                ScheduleSection(kind="cosine", warmup_steps=warmup, min_lr_ratio=0.1))
    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    print(f"model: demo preset, {model.config.num_params():,} parameters, fp32, {torch.get_num_threads()} threads; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g} "
          f"(warmup {warmup}, cosine to {0.1 * args.lr:g})"
          + (f", stopping after {args.minutes:g} min" if args.minutes else ""))
    width, vocab = len(str(args.steps)), model.config.vocab_size
    val_losses = [(0, evaluate(model, val, args.batch_size))]
    print(f"step {0:>{width}}/{args.steps}  val loss {val_losses[0][1]:.4f}  "
          f"(uniform over {vocab} ids: {math.log(vocab):.4f})", flush=True)
    log(0, {"val/loss": val_losses[0][1]})

    # The ETA counts from here (evaluations included), capped by the time --minutes leaves.
    limit = args.minutes * 60 if args.minutes else None
    progress = Progress(args.steps, rank=0, stream=sys.stdout, every_seconds=1.0 if sys.stdout.isatty() else 10.0,
                        time_limit_s=limit)
    ema = ema_weight = train_seconds = 0.0
    step, stopped_early, start = 0, False, time.perf_counter()
    while step < args.steps:
        t_step = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        input_ids, labels = sample_batch(train_tokens, args.batch_size, args.seq_len, gen)
        loss = model(input_ids, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        scheduler.step()
        step += 1
        train_seconds += time.perf_counter() - t_step

        loss_value = loss.detach().item()
        ema, ema_weight = 0.9 * ema + 0.1 * loss_value, 0.9 * ema_weight + 0.1
        elapsed = time.perf_counter() - start
        record = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                  "train/tokens_per_second": step * tokens_per_step / train_seconds, "train/elapsed_seconds": elapsed}
        progress.update(step, {**record, "train/loss": ema / ema_weight})
        out_of_time = limit is not None and elapsed >= limit
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            val_losses.append((step, evaluate(model, val, args.batch_size)))
            progress.message(f"step {step:>{width}}/{args.steps}  val loss {val_losses[-1][1]:.4f}")
            record["val/loss"] = val_losses[-1][1]
        log(step, record)
        if out_of_time and step < args.steps:
            stopped_early = True
            progress.message(f"stopped at step {step}/{args.steps}: --minutes {args.minutes:g} reached")
            break
    tokens_per_s = step * tokens_per_step / train_seconds
    progress.message(f"trained {step} steps in {time.perf_counter() - start:.0f} s: val loss "
                     f"{val_losses[0][1]:.4f} -> {val_losses[-1][1]:.4f} nats/byte "
                     f"({val_losses[-1][1] / math.log(2):.2f} bits/byte), {tokens_per_s:,.0f} tok/s")
    return {"initial_val_loss": val_losses[0][1], "final_val_loss": val_losses[-1][1], "val_losses": val_losses,
            "steps": step, "planned_steps": args.steps, "stopped_early": stopped_early,
            "tokens_per_s": tokens_per_s, "train_seconds": train_seconds}


def run_demo(args: argparse.Namespace) -> dict:
    """Train the demo preset on stdlib docstrings, evaluate, generate; print progress to stdout.

    ``args`` holds the fields of ``add_demo_args``. Returns a dict: ``initial_val_loss``, ``final_val_loss``
    (nats per byte), ``val_losses`` [(step, loss)], ``steps`` (done), ``planned_steps``, ``stopped_early``,
    ``tokens_per_s`` (training tokens over training time, evaluation excluded), ``train_seconds``,
    ``samples`` {prompt: generated text including the prompt}, and ``model`` (the trained Transformer, fp32).
    With ``--out``, metrics.jsonl holds MetricsLogger records: ``val/loss`` at step 0, ``train/*`` (and
    ``val/loss`` at evaluations) per step, then a last record of ``final/*`` (initial_val_loss, val_loss,
    tokens_per_second).
    """
    _check_args(args)
    tok = Bytes()
    train_tokens, val = _split_corpus(args, tok)
    # The byte ids of the specials go into config.json, so a saved folder says how to read its vocabulary.
    config = dataclasses.replace(preset_config("demo"), extra={
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    model = Transformer(config, seed=args.seed).float().train()
    with contextlib.ExitStack() as stack:  # closes metrics.jsonl however the run ends
        log = _open_log(args, stack)
        result = _train(args, model, train_tokens, val, log)
        result["samples"] = generate_samples(model.eval(), args.prompt or list(DEFAULT_PROMPTS),
                                             args.max_new_tokens, args.temperature, args.seed)
        if args.out:
            save_hf(model, args.out)
            print(f"\nsaved the model (HF format) and metrics.jsonl to {args.out}")
        log(result["steps"], {"final/initial_val_loss": result["initial_val_loss"],
                              "final/val_loss": result["final_val_loss"],
                              "final/tokens_per_second": result["tokens_per_s"]})
    result["model"] = model
    return result
