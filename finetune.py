"""What SFT and DPO share: length-bucketed batches, stage configs with `--set` overrides, the [train] table
turned into a train_loop.TrainConfig, and the training flags of both command lines.

sft.py and dpo.py are entry scripts; this module is the library they both import (nothing imports an
entry script).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import settings

IGNORE = -100   # target id that the loss skips (torch cross_entropy's ignore_index)


# ---------------------------------------------------------------------------------------------- batching

def bucket_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 64
                   ) -> list[np.ndarray]:
    """One epoch's batches of example indices: shuffle, cut into chunks of `bucket_batches` batches, sort each
    chunk by length, cut into batches, shuffle the batch order. Neighbours in a sorted chunk have similar
    lengths, so padding stays small, while each epoch still mixes examples differently (as in fairseq/ESPnet
    bucketing). The remainder (< batch_size examples) waits for the next epoch's permutation."""
    n = len(lengths)
    perm = rng.permutation(n)
    if n >= batch_size:
        perm = perm[: n - n % batch_size]
    chunk = batch_size * bucket_batches
    batches = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def pad_length(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


# ------------------------------------------------------------------------------------------------ configs

def schedule(total_steps: int, warmup_fraction: float, decay_fraction: float) -> dict:
    warmup = int(round(total_steps * warmup_fraction))
    decay = int(round(total_steps * decay_fraction))
    return {"warmup_steps": warmup, "decay_steps": decay, "stable_steps": max(0, total_steps - warmup - decay)}


def make_train_config(train: dict, out_dir: str, total_steps: int, warmup_fraction: float, decay_fraction: float,
                      extra: dict, where: str = "[train]"):
    """TrainConfig from a [train] table; total/warmup/stable/decay steps filled in unless the table sets them."""
    from train_loop import TrainConfig
    table = {**schedule(total_steps, warmup_fraction, decay_fraction), **train}
    table.setdefault("total_steps", total_steps)
    table["out_dir"] = out_dir
    table["extra"] = {**table.get("extra", {}), **extra}
    return settings.build(TrainConfig, table, where)


def load_config(cls, name_or_path: str, config_dir, sets, name_key: str, what: str):
    """A stage/run config: `<config_dir>/<name>.toml` (or a .toml path), `--set` overrides applied, into `cls`
    (settings.load: typed, unknown keys and out-of-range values are errors); its name defaults to the stem."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir) / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no {what} config {path}")
    table = settings.apply_sets(settings.read_toml(path), sets, f"{path}: --set")
    table.setdefault(name_key, path.stem)
    cfg = settings.build(cls, table, str(path))
    from train_loop import TrainConfig   # check [train] now, not after the model is loaded
    settings.build(TrainConfig, {"out_dir": "", "total_steps": 1, **cfg.train}, f"{path}[train]")
    return cfg


def fit_seq_len(train_table: dict, model) -> int:
    """The stage's seq_len, or the model's context if that is shorter (a small model in a quick run):
    longer examples are then dropped and counted, never cut."""
    context = model.config.max_seq_len
    seq_len = int(train_table.get("seq_len", context))
    if seq_len > context:
        print(f"seq_len {seq_len} is longer than the model's context {context}; using {context}")
        seq_len = context
    train_table["seq_len"] = seq_len
    return seq_len


def check_init_from(path, hint: str) -> Path:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"starting checkpoint {path} not found ({hint})")
    return path


# ---------------------------------------------------------------------------------------------------- CLI

TRAIN_FLAGS = [("--batch-size", int, "batch_size",
                "sequences (SFT), pairs (DPO) or prompts (GRPO) per micro-batch per rank"),
               ("--grad-accum", int, "grad_accum", "micro-batches per optimizer step"),
               ("--seq-len", int, "seq_len", "longest example in tokens (longer ones are dropped, counted)"),
               ("--lr", float, "lr", "peak learning rate"), ("--min-lr", float, "min_lr", None),
               ("--dtype", str, "dtype", "bf16, fp16 or fp32"), ("--device", str, "device", "auto, cpu or cuda"),
               ("--eval-interval", int, "eval_interval", None), ("--save-interval", int, "save_interval", None),
               ("--seed", int, "seed", None)]


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Shortcuts for the common [train] keys of sft.py and dpo.py; anything else: --set train.key=value."""
    settings.add_set_flag(p)
    g = p.add_argument_group("training (shortcuts for --set train.<key>=...)")
    g.add_argument("--steps", type=int, help="total optimizer steps (default: from epochs)")
    for flag, kind, _, help_text in TRAIN_FLAGS:
        g.add_argument(flag, type=kind, help=help_text)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def train_overrides(args) -> list[str]:
    out = [f"train.{key}={json.dumps(getattr(args, flag[2:].replace('-', '_')))}"
           for flag, _, key, _ in TRAIN_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.steps is not None:
        out.append(f"train.total_steps={args.steps}")
    if args.compile:
        out.append("train.compile=true")
    if args.no_progress:
        out.append("train.progress=false")
    return out


def cli_overrides(args, top_level: tuple[str, ...] = ("data", "init_from", "out_dir")) -> list[str]:
    """Every override a trainer's command line gives, in the order they apply: the [train] shortcuts, then
    `--set`, then the top-level flags named in `top_level` (each `--flag` is `flag=<json>` when given)."""
    overrides = train_overrides(args) + list(args.sets)
    for key in top_level:
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def run_cli(job) -> int:
    """Run a trainer's job (a no-argument callable returning its summary) the way every trainer CLI does: a
    configuration or missing-file error is one line on stderr and exit code 2; the summary is printed as JSON."""
    from checkpoint import CheckpointError
    from fileio import DiskFullError, LockedError
    from train_loop import shutdown_distributed
    try:
        summary = job()
    except (settings.ConfigError, FileNotFoundError, LockedError, DiskFullError, CheckpointError) as e:
        # another run holds the out dir, the disk filled up during a save, a checkpoint failed verification
        print(f"error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "param_sha256"}, default=str))
    shutdown_distributed()   # under torchrun: every rank leaves the process group together
    return 0
