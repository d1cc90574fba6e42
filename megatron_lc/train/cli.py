"""``megatron-lc train``: argument parsing and the glue to the trainer."""
from __future__ import annotations

import argparse
import os
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/); omitted: defaults plus the overrides")
    p.add_argument("--resume", help="none | auto (newest complete checkpoint in checkpoint.dir) | a step_<N> folder; "
                                    "same as checkpoint.resume=...")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults + --config YAML + overrides) as YAML and exit without "
                        "training")
    p.add_argument("--list-keys", action="store_true",
                   help="list every config key with its type, default and meaning, and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. optim.lr=1e-4 train.steps=10 parallel.cp=2 (before or after "
                        "the flags)")


def run_train(args: argparse.Namespace) -> int:
    """Load and check the config (before any process group starts), then train. Returns 0, EXIT_STOPPED (143)
    when SIGTERM stopped the run after its checkpoint (requeue it: `--resume auto` continues), or 1 after a
    collective timeout or when a newer process took the run folder over (the message says which)."""
    from ..configtools import ConfigError
    from .config import load_train_config, to_yaml

    if args.list_keys:
        print(list_keys())
        return 0
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.print_config:  # the datasets need not exist yet: only the config is shown
        print(to_yaml(load_train_config(args.config, overrides, check_paths=False)), end="")
        return 0
    try:
        cfg = load_train_config(args.config, overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.check_world(world)  # a mesh that does not fit the world fails here, on every rank, before any collective
        return _train(cfg)
    except ConfigError:
        if os.environ.get("RANK", "0") != "0":  # every rank has the same error: rank 0 alone says it
            return 2
        raise


def list_keys() -> str:
    """Every config key, one per line: ``key  type  default  doc`` (columns aligned)."""
    from ..configtools import yaml_text
    from .config import config_keys

    rows = [(key, tp, yaml_text(default), doc) for key, tp, default, doc in config_keys()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    head = ("key", "type", "default")
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  meaning"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


def _train(cfg) -> int:
    from ..distributed import CollectiveTimeout
    from .run_folder import RunFolderTakenOver
    from .trainer import StoppedBySignal, train

    try:
        train(cfg)
    except StoppedBySignal as e:  # rank 0 has printed the line saying so
        return e.status
    except (CollectiveTimeout, RunFolderTakenOver) as e:
        print(f"[megatron-lc] error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
