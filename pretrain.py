"""Pretraining under the MiniCPM-style staged curriculum: `python pretrain.py --phase stable` (or `--all`).

The curriculum lives in config/pretrain/: `schedule.toml` holds what is global (the phase order, the model
preset, the token budget, the Warmup-Stable-Decay learning rate of MiniCPM, arXiv 2404.06395, and the batch
geometry); `<phase>.toml` holds one phase (its data mixture over data/pretrain/<corpus>, its token budget,
and the phase whose final checkpoint it continues). Steps are global across phases and the LR is one
function of the global step (train_loop.wsd_lr), so running the phases one by one gives the same LR curve as
`--all`, and each phase continues the previous one's weights and optimizer state.

This file owns the pretraining data: `MixtureLoader` samples training windows from the token shards by
memmap (data_process.shards.IndexedDataset), and `make_val_fn` scores fixed val windows per corpus (loss and
bits per character). The loop itself is train_loop.train, shared with SFT and DPO.

    sh script/pretrain.sh warmup        # out/pretrain/warmup/final/
    sh script/pretrain.sh stable        # continues from out/pretrain/warmup/final/
    torchrun --nproc_per_node 8 pretrain.py --phase stable     # DDP; multi-node with torchrun's usual args
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import bpc
import checkpoint
import settings
import train_loop
from fileio import DiskFullError
from settings import limits
from data_process.shards import IndexedDataset
from data_process.tokenize_docs import check_manifest

SCHEDULE_FILE = "schedule.toml"


# ----------------------------------------------------------------------------- curriculum config

@dataclass
class ModelTable:                    # [model] of schedule.toml
    preset: str = "26m"              # model.PRESETS; the vocabulary size comes from the tokenizer
    # the model's context for a fresh model; 0 = the preset's. A --seq-len longer than the context is an
    # error, never a silently longer context: raise it here explicitly
    max_seq_len: int = field(default=0, metadata=limits(ge=0))


@dataclass
class ScheduleTable:                 # [schedule] of schedule.toml
    total_tokens: int = field(default=2_000_000_000, metadata=limits(ge=1))
    peak_lr: float = field(default=1e-3, metadata=limits(gt=0))
    min_lr: float = field(default=1e-4, metadata=limits(ge=0))
    warmup_fraction: float = field(default=0.01, metadata=limits(ge=0, le=1))   # of the curriculum's steps
    decay_fraction: float = field(default=0.10, metadata=limits(ge=0, le=1))    # ending with the last phase
    decay: str = field(default="exp", metadata=limits(choices=("exp", "linear", "cosine")))


@dataclass
class LoaderTable:                   # pretraining's own keys in [train] (the rest are TrainConfig fields)
    val_windows: int = field(default=32, metadata=limits(ge=1))   # fixed val windows per corpus
    pack: bool = True                # windows across document boundaries (see MixtureLoader)


@dataclass
class ScheduleFile:                  # config/pretrain/schedule.toml
    phases: list[str]
    model: ModelTable = field(default_factory=ModelTable)
    schedule: ScheduleTable = field(default_factory=ScheduleTable)
    train: dict = field(default_factory=dict)


@dataclass
class Schedule:
    phases: list[str]
    preset: str = "26m"
    max_seq_len: int = 0             # [model] max_seq_len: 0 = the preset's context
    total_tokens: int = 2_000_000_000
    peak_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_fraction: float = 0.01    # of the curriculum's steps
    decay_fraction: float = 0.10     # of the curriculum's steps, ending with the last phase
    decay: str = "exp"
    train: dict = field(default_factory=dict)   # TrainConfig fields + LoaderTable keys for every phase


@dataclass
class Phase:
    name: str
    mixture: dict[str, float] = field(default_factory=dict, metadata=limits(ge=0))   # corpus -> weight
    fraction: float = field(default=0.0, metadata=limits(ge=0, le=1))   # of schedule.total_tokens ...
    tokens: int = field(default=0, metadata=limits(ge=0))               # ... or absolute
    init_from: str = ""              # phase whose final checkpoint this one continues ("" = fresh model)
    description: str = ""
    # a mixture corpus that is not in the data dir (or too small for one window) is an error unless this is
    # true: then it is dropped with a warning and the other weights renormalized
    allow_missing: bool = False
    file: str = ""                   # the phase file (set by load_phase, for messages)


LOADER_KEYS = {f.name for f in dataclasses.fields(LoaderTable)}


def check_train_table(train: dict, where: str) -> dict:
    """[train] of schedule.toml (plus command-line values): TrainConfig fields and LoaderTable keys, typed and
    range-checked; returns it with every value checked."""
    loader = settings.build(LoaderTable, {k: v for k, v in train.items() if k in LOADER_KEYS}, where)
    rest = {k: v for k, v in train.items() if k not in LOADER_KEYS}
    bad = sorted(set(rest) & {"out_dir", "total_steps", "lr", "min_lr", "warmup_steps", "stable_steps",
                              "decay_steps", "decay", "init_from", "resume", "extra"})
    if bad:
        raise settings.ConfigError(f"{where}: {bad} are set by the curriculum ([schedule], the phases), not [train]")
    settings.build(train_loop.TrainConfig, {"out_dir": "", "total_steps": 1, **rest}, where)
    return {**rest, **dataclasses.asdict(loader)}


def load_schedule(config_dir, sets=()) -> Schedule:
    path = Path(config_dir) / SCHEDULE_FILE
    f = settings.load(ScheduleFile, path, sets)
    if not f.phases:
        raise settings.ConfigError(f"{path}: `phases` (the curriculum order) is empty")
    return Schedule(phases=f.phases, preset=f.model.preset, max_seq_len=f.model.max_seq_len,
                    train=check_train_table(f.train, f"{path}[train]"),
                    **dataclasses.asdict(f.schedule))


def load_phase(config_dir, name: str) -> Phase:
    path = Path(config_dir) / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no phase config {path}")
    phase = settings.load(Phase, path, name=name, file=str(path))
    if not phase.mixture:
        raise settings.ConfigError(f"{path}: [mixture] is empty; give at least one corpus = weight")
    if bool(phase.fraction) == bool(phase.tokens):
        raise settings.ConfigError(f"{path}: give exactly one of `fraction` (of schedule.total_tokens) or `tokens`")
    return phase


@dataclass
class Plan:
    """Where each phase sits on the global step axis, and the WSD parameters of the whole curriculum."""
    tokens_per_step: int
    bounds: dict[str, tuple[int, int]]   # phase -> (start_step, end_step)
    total_steps: int
    warmup_steps: int
    stable_steps: int
    decay_steps: int


def plan_curriculum(schedule: Schedule, phases: list[Phase], tokens_per_step: int) -> Plan:
    """Phase budgets -> global step ranges (rounded on the cumulative token count, so rounding never drifts),
    and the WSD segment lengths as fractions of the whole curriculum: the decay ends with the last phase."""
    bounds, cum_tokens, start = {}, 0.0, 0
    for phase in phases:
        cum_tokens += phase.tokens or phase.fraction * schedule.total_tokens
        end = max(start + 1, round(cum_tokens / tokens_per_step))
        bounds[phase.name] = (start, end)
        start = end
    total = start
    warmup = round(schedule.warmup_fraction * total)
    decay = round(schedule.decay_fraction * total)
    return Plan(tokens_per_step=tokens_per_step, bounds=bounds, total_steps=total, warmup_steps=warmup,
                stable_steps=max(0, total - warmup - decay), decay_steps=decay)


def lr_curve(schedule: Schedule, plan: Plan) -> list[float]:
    """The LR at every global step of the curriculum (what tests compare the runs against)."""
    return [train_loop.wsd_lr(s, peak_lr=schedule.peak_lr, warmup_steps=plan.warmup_steps,
                              stable_steps=plan.stable_steps, decay_steps=plan.decay_steps,
                              min_lr=schedule.min_lr, decay=schedule.decay) for s in range(plan.total_steps)]


# ----------------------------------------------------------------------------- corpora

@dataclass
class Corpus:
    name: str
    train: list[IndexedDataset]
    val: list[IndexedDataset]


def open_corpus(data_dir: Path, name: str, tokenizer_sha256: str, min_tokens: int) -> Corpus | None:
    """Open data/pretrain/<name> by memmap. None (with a warning) when the corpus is absent or has no train
    tokens; an error when it was tokenized with another tokenizer."""
    root = Path(data_dir) / name
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        print(f"warning: corpus {name!r} not found ({manifest_path} missing)", file=sys.stderr)
        return None
    # finished, every listed shard consistent with its .idx, and made with this run's tokenizer (else ValueError)
    manifest = check_manifest(root, tokenizer_sha256)
    splits = manifest["splits"]
    train = [IndexedDataset(root / s) for s in splits.get("train", {}).get("shards", [])]
    train = [ds for ds in train if ds.num_tokens >= 2]
    n_train = sum(ds.num_tokens for ds in train)
    if train and max(ds.num_tokens for ds in train) < min_tokens:
        # small corpora (the embedded samples) stay in the mixture: their windows are the shards, shorter and
        # padded (see MixtureLoader), never silently dropped
        print(f"warning: corpus {name!r} has {n_train} train tokens, no shard of one full window ({min_tokens} "
              f"tokens): its windows are shorter than --seq-len, padded", file=sys.stderr)
    # every val shard with tokens: one shorter than a window is still scored (val_windows scores it whole)
    val = [ds for ds in (IndexedDataset(root / s) for s in splits.get("val", {}).get("shards", []))
           if ds.num_tokens >= 2]
    if not train:
        print(f"warning: corpus {name!r} has no train tokens", file=sys.stderr)
        return None
    return Corpus(name=name, train=train, val=val)


def open_mixture(data_dir: Path, mixture: dict[str, float], tokenizer_sha256: str, seq_len: int,
                 phase: str = "", allow_missing: bool = False, where: str = "") -> tuple[list[Corpus], np.ndarray]:
    """Open every corpus of a mixture. A corpus that is missing (or has no train tokens) is an error naming the
    phase file and key, unless allow_missing: then it is dropped (warned) and the weights renormalized over the
    ones present."""
    where = where or f"config/pretrain/{phase}.toml"
    corpora, weights, missing = [], [], []
    for name, weight in mixture.items():
        if weight <= 0:
            continue
        corpus = open_corpus(data_dir, name, tokenizer_sha256, seq_len + 1)
        if corpus is None:
            missing.append(name)
        else:
            corpora.append(corpus)
            weights.append(weight)
    if missing and not allow_missing:
        present = sorted(p.parent.name for p in Path(data_dir).glob("*/manifest.json"))
        raise settings.ConfigError(
            f"{where}: mixture {', '.join(f'{n!r}' for n in missing)}: not in {data_dir} (or without train "
            f"tokens); corpora there: {present}. Fix the name, run `python data_process.py`, or set "
            f"allow_missing = true to drop them")
    if not corpora:
        raise FileNotFoundError(f"phase {phase!r}: none of its corpora {sorted(mixture)} is in {data_dir} "
                                f"(run `python data_process.py` first, or edit {where})")
    weights = np.array(weights, dtype=np.float64) / sum(weights)
    if missing:
        print(f"phase {phase!r}: allow_missing: dropped {missing}; mixture renormalized over the corpora "
              f"present: " + ", ".join(f"{c.name} {w:.3f}" for c, w in zip(corpora, weights)), file=sys.stderr)
    return corpora, weights


# ----------------------------------------------------------------------------- data loader

class MixtureLoader:
    """Training windows of seq_len + 1 tokens drawn from the token shards by memmap.

    Each row picks a corpus by mixture weight, then a uniformly random window start over all of that corpus's
    train tokens. The draw is a pure function of (seed, step, micro_step, rank), so resume is exact, DDP
    ranks see different data without coordination, and the loader needs no position to restore; its state
    (what it was built with, and how many windows it drew per corpus) goes into the checkpoint to check that
    a resumed run reads the same data.

    Default `pack=True`: windows run across document boundaries (every document ends with the end-of-text id,
    so the model sees where documents end), as GPT-2/nanoGPT, Megatron and MiniCPM train: no padding, every
    token of a step is trained on, and short documents (most web and encyclopedia text is shorter than a
    window) are used as they are. `pack=False` keeps each window inside one document (picked with
    probability proportional to its length, so tokens are still drawn uniformly) and pads short documents
    (targets -100): cleaner context for long-document corpora, at the cost of padded tokens.
    Random window starts, not epochs: at the curriculum's budgets each corpus is seen about once or less,
    and stateless sampling is what makes the position part of (seed, step) rather than a cursor to save.
    """

    def __init__(self, corpora: list[Corpus], weights, batch_size: int, seq_len: int, *, seed: int = 1337,
                 rank: int = 0, pack: bool = True, pad_id: int = 0):
        self.corpora, self.weights = corpora, np.asarray(weights, dtype=np.float64)
        self.batch_size, self.seq_len, self.seed, self.rank, self.pack, self.pad_id = \
            batch_size, seq_len, seed, rank, pack, pad_id
        self.windows_drawn = {c.name: 0 for c in corpora}
        # per corpus: cumulative count of window starts over its shards (pack) or of tokens (within-document)
        self._starts = []
        for c in corpora:
            # a shard shorter than a window is one (shorter, padded) window
            sizes = [max(1, ds.num_tokens - seq_len) if pack else ds.num_tokens for ds in c.train]
            self._starts.append(np.cumsum([0] + sizes, dtype=np.int64))

    def _window(self, ci: int, u: int) -> np.ndarray:
        """The window for corpus ci at uniform draw u in [0, total starts/tokens)."""
        cum = self._starts[ci]
        si = int(np.searchsorted(cum, u, side="right")) - 1
        ds, pos = self.corpora[ci].train[si], int(u - cum[si])
        T1 = self.seq_len + 1
        if self.pack:
            return ds.tokens[pos:pos + T1]
        d = int(np.searchsorted(ds.doc_starts, pos, side="right")) - 1   # the document holding token pos
        start, length = int(ds.doc_starts[d]), int(ds.doc_lengths[d])
        if length <= T1:
            return ds.tokens[start:start + length]
        offset = min(pos - start, length - T1)
        return ds.tokens[start + offset:start + offset + T1]

    def next_batch(self, step: int, micro_step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, micro_step, self.rank])
        B, T = self.batch_size, self.seq_len
        corpus_ids = rng.choice(len(self.corpora), size=B, p=self.weights)
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), -100, dtype=np.int64)
        for row, ci in enumerate(corpus_ids):
            window = self._window(ci, int(rng.integers(0, self._starts[ci][-1])))
            n = len(window) - 1
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
            self.windows_drawn[self.corpora[ci].name] += 1
        return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "pack": self.pack,
                "corpora": [c.name for c in self.corpora], "weights": self.weights.tolist(),
                "windows_drawn": dict(self.windows_drawn)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "seq_len", "batch_size", "pack", "corpora") if state.get(k) != mine[k]]
        if not changed and not np.allclose(state.get("weights", []), self.weights):
            changed = ["weights"]
        if changed:
            print(f"warning: the data loader differs from the checkpoint's ({', '.join(changed)}); "
                  f"the resumed run will not read the same data as an uninterrupted one", file=sys.stderr)
        self.windows_drawn.update({k: v for k, v in state.get("windows_drawn", {}).items()
                                   if k in self.windows_drawn})


# ----------------------------------------------------------------------------- validation

def val_windows(corpus: Corpus, seq_len: int, n_windows: int) -> list[np.ndarray]:
    """A fixed, deterministic subset of val windows: n_windows non-overlapping windows of seq_len + 1 tokens,
    evenly spaced over the corpus's val split (the same windows at every validation and in every run).
    A split shorter than one window is scored whole, as one shorter window."""
    slots = []   # (shard, start) of every non-overlapping window
    for ds in corpus.val:
        slots += [(ds, i * seq_len) for i in range((ds.num_tokens - 1) // seq_len)]
    if not slots:
        # a val split shorter than one window (small corpora, the embedded samples): score all of it as one
        # shorter window rather than not validating the corpus at all
        tokens = np.concatenate([np.asarray(ds.tokens, dtype=np.int64) for ds in corpus.val] or [np.zeros(0)])
        return [tokens[: seq_len + 1].astype(np.int64)] if len(tokens) >= 2 else []
    picks = np.unique(np.linspace(0, len(slots) - 1, num=min(n_windows, len(slots))).round().astype(int))
    return [np.asarray(slots[i][0].tokens[slots[i][1]:slots[i][1] + seq_len + 1], dtype=np.int64) for i in picks]


def make_val_fn(corpora: list[Corpus], seq_len: int, n_windows: int, batch_size: int, device: str, tokenizer):
    """val_fn(model) -> {"val/<corpus>/loss", "val/<corpus>/bpc", "val/loss"} on fixed windows, scored by
    bpc.score_windows (the scorer eval.py uses too): bits per character counts exactly the characters of the
    text tokens scored, so it compares across tokenizers, which per-token loss does not."""
    windows = {c.name: val_windows(c, seq_len, n_windows) for c in corpora}
    for c in corpora:
        if not windows[c.name]:
            print(f"warning: corpus {c.name!r} has no val tokens; not validated", file=sys.stderr)

    def val_fn(model) -> dict:
        out, total = {}, bpc.Score()
        for c in corpora:
            if not windows[c.name]:
                continue
            score = bpc.score_windows(model, tokenizer, windows[c.name], batch_size)
            out[f"val/{c.name}/loss"] = score.loss
            if score.chars:
                out[f"val/{c.name}/bpc"] = score.bits_per_char
            total = total.add(score)
        if total.tokens:
            out["val/loss"] = total.loss
        return out

    return val_fn


# ----------------------------------------------------------------------------- one phase

FLAG_KEYS = ("batch_size", "grad_accum", "seq_len", "dtype", "eval_interval", "save_interval", "keep_last", "seed",
             "val_windows")


def build_config(args, schedule: Schedule) -> dict:
    """schedule.toml's [train] (defaults: TrainConfig's and LoaderTable's), overridden by the command-line
    shortcuts that were given; checked like the file."""
    t = dict(schedule.train)
    for key in FLAG_KEYS:
        if getattr(args, key) is not None:
            t[key] = getattr(args, key)
    if args.compile:
        t["compile"] = True
    if args.within_doc:
        t["pack"] = False
    t = check_train_table(t, "schedule.toml [train] (or its command-line flag)")
    defaults = {f.name: f.default for f in dataclasses.fields(train_loop.TrainConfig)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **t}


def run_phase(name: str, args, schedule: Schedule) -> dict:
    info = train_loop.init_distributed(args.device)
    config_dir, out_root, data_dir = Path(args.config_dir), Path(args.out_dir), Path(args.data_dir)
    phases = [load_phase(config_dir, p) for p in schedule.phases]
    if name not in schedule.phases:
        raise ValueError(f"unknown phase {name!r}; the curriculum is {schedule.phases}")
    phase = phases[schedule.phases.index(name)]
    t = build_config(args, schedule)
    tokens_per_step = t["batch_size"] * t["grad_accum"] * t["seq_len"] * info.world_size
    plan = plan_curriculum(schedule, phases, tokens_per_step)
    start_step, end_step = plan.bounds[name]
    if args.max_steps is not None:
        end_step = min(end_step, start_step + args.max_steps)

    out_dir = out_root / name
    with train_loop.rank0_lock(out_dir):   # before reading its checkpoints: one run per out dir
        return _run_phase_locked(name, args, schedule, info, phase, t, plan, start_step, end_step, tokens_per_step,
                                 out_dir, out_root, data_dir)


def _run_phase_locked(name, args, schedule, info, phase, t, plan, start_step, end_step, tokens_per_step,
                      out_dir, out_root, data_dir) -> dict:
    from model import ModelConfig, Transformer, make_config
    from tokenizer import Tokenizer
    tokenizer = Tokenizer.load(args.tokenizer)

    # the newest checkpoint that verifies (train() sets aside newer ones that fail, under the lock)
    own = checkpoint.resume_point(out_dir, set_aside_bad=False) if not args.no_resume else None
    init_dir = ""
    if phase.init_from:
        init_dir = out_root / phase.init_from / "final"
        if own is None and not (init_dir / "meta.json").is_file():
            raise FileNotFoundError(f"phase {name!r} continues from {init_dir}, which does not exist: run "
                                    f"`sh script/pretrain.sh {phase.init_from}` first")
    if own is not None:              # resuming this phase: the model is the checkpoint's
        model_cfg = ModelConfig.from_dict(json.loads((own / "config.json").read_text()))
    elif init_dir:                   # continuing the previous phase
        prev = checkpoint.verify_checkpoint(init_dir)
        if prev["step"] != start_step:
            raise ValueError(f"{init_dir} ends at step {prev['step']}, but this curriculum starts phase {name!r} "
                             f"at step {start_step} (tokens per step {tokens_per_step}); the batch geometry, "
                             f"world size or token budgets changed since that phase ran, or it was cut short "
                             f"with --max-steps")
        model_cfg = ModelConfig.from_dict(json.loads((init_dir / "config.json").read_text()))
    else:
        preset = args.preset or schedule.preset
        context = schedule.max_seq_len or make_config(preset, tokenizer.vocab_size).max_seq_len
        model_cfg = make_config(preset, tokenizer.vocab_size, max_seq_len=context)
    if t["seq_len"] > model_cfg.max_seq_len:
        where = "the checkpoint it continues" if (own or init_dir) else f"preset {args.preset or schedule.preset!r}"
        raise settings.ConfigError(
            f"--seq-len {t['seq_len']} is longer than the model's context {model_cfg.max_seq_len} ({where}); use "
            f"--seq-len {model_cfg.max_seq_len} or less" + ("" if (own or init_dir) else
            ", or raise the context explicitly in schedule.toml [model] max_seq_len (or --set model.max_seq_len=N)"))
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model vocab {model_cfg.vocab_size} != tokenizer vocab {tokenizer.vocab_size}")
    corpora, weights = open_mixture(data_dir, phase.mixture, tokenizer.sha256, t["seq_len"], name,
                                    phase.allow_missing, phase.file)
    loader = MixtureLoader(corpora, weights, t["batch_size"], t["seq_len"], seed=t["seed"], rank=info.rank,
                           pack=t["pack"], pad_id=tokenizer.pad_id)
    torch.manual_seed(t["seed"])     # identical initial weights on every rank and every run
    model = Transformer(model_cfg)

    train_keys = {k: v for k, v in t.items() if k not in LOADER_KEYS}
    cfg = train_loop.TrainConfig(
        **{**train_keys, "out_dir": str(out_dir), "total_steps": end_step, "lr": args.lr or schedule.peak_lr,
           "min_lr": args.min_lr or schedule.min_lr, "warmup_steps": plan.warmup_steps,
           "stable_steps": plan.stable_steps, "decay_steps": plan.decay_steps, "decay": schedule.decay,
           "device": args.device, "resume": not args.no_resume, "init_from": str(init_dir),
           "progress": not args.no_progress, "wandb_project": args.wandb or "", "tensorboard": args.tensorboard},
        extra={"phase": name, "mixture": {c.name: float(w) for c, w in zip(corpora, weights)},
               "phase_steps": [start_step, plan.bounds[name][1]], "curriculum_steps": plan.total_steps,
               "tokens_per_step": tokens_per_step, "pack": t["pack"]})
    if info.is_main:
        print(f"phase {name}: steps {start_step}..{end_step} of {plan.total_steps} "
              f"({tokens_per_step:,} tokens/step, {(end_step - start_step) * tokens_per_step:,} tokens), "
              f"model {model.num_params() / 1e6:.1f}M params, {cfg.dtype} on {info.device} x{info.world_size}")
    val_fn = make_val_fn(corpora, t["seq_len"], t["val_windows"], t["batch_size"], info.device, tokenizer)
    # what trained it: carried on by every later phase, SFT stage and DPO run, read back by eval.py
    init_meta = checkpoint.verify_checkpoint(init_dir) if init_dir and (init_dir / "meta.json").is_file() else None
    provenance = checkpoint.provenance_chain(init_meta, checkpoint.data_provenance(f"pretrain {name}", data_dir,
                                                                                   args.recipe))
    return train_loop.train(cfg, model, tokenizer, loader, val_fn=val_fn,
                            meta={"kind": "base", "phase": name, "chat": False, "provenance": provenance})


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings not given here come from config/pretrain/schedule.toml.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--phase", help="one curriculum phase (warmup, stable, anneal, converge)")
    which.add_argument("--all", action="store_true", help="every phase in order")
    p.add_argument("--config-dir", default="config/pretrain", help="schedule.toml + <phase>.toml")
    p.add_argument("--data-dir", default="data/pretrain", help="token shards, one dir per corpus")
    p.add_argument("--recipe", default="config/recipe.toml",
                   help="the data recipe that made --data-dir (recorded in each checkpoint's provenance, with its "
                        "eval sets, for eval.py's contamination report)")
    p.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir or .model the shards were made with")
    p.add_argument("--out-dir", default="out/pretrain", help="checkpoints go to <out-dir>/<phase>/")
    p.add_argument("--preset", help="model preset for a fresh model (model.PRESETS: tiny, 26m, 100m, deep, "
                                    "moe); vocab size comes from the tokenizer")
    p.add_argument("--total-tokens", type=float, help="override the curriculum's token budget")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--save-interval", type=int)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--val-windows", type=int, help="val windows per corpus")
    p.add_argument("--within-doc", action="store_true", help="keep windows inside documents (default: pack)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-steps", type=int, help="stop this phase after this many steps (a smoke run)")
    p.add_argument("--no-resume", action="store_true", help="ignore this phase's checkpoints and start it over")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to wandb (if installed)")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    settings.add_set_flag(p, "schedule.peak_lr=6e-4 (keys of schedule.toml)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = False
    try:
        schedule = load_schedule(args.config_dir, args.sets)
        if args.total_tokens:
            schedule.total_tokens = int(args.total_tokens)
        for name in (schedule.phases if args.all else [args.phase]):
            summary = run_phase(name, args, schedule)
            if train_loop.init_distributed(args.device).is_main:
                val = " ".join(f"{k}={v:.4f}" for k, v in summary["val"].items() if k.endswith(("bpc", "val/loss")))
                print(f"phase {name} done: step {summary['step']}, {summary['tokens_seen']:,} tokens, "
                      f"loss {summary['loss']:.4f} {val} -> {summary['final_dir']}")
        ok = True
    except (train_loop.TrainingDiverged, checkpoint.CheckpointError, FileNotFoundError, ValueError,
            train_loop.LockedError, DiskFullError) as e:
        print(f"error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr)
        return 1
    finally:
        train_loop.shutdown_distributed(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
