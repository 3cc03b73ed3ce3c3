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
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import train_loop
from data_process.shards import IndexedDataset
from data_process.tokenize_docs import check_manifest

SCHEDULE_FILE = "schedule.toml"


# ----------------------------------------------------------------------------- curriculum config

@dataclass
class Schedule:
    phases: list[str]
    preset: str = "26m"
    total_tokens: int = 2_000_000_000
    peak_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_fraction: float = 0.01    # of the curriculum's steps
    decay_fraction: float = 0.10     # of the curriculum's steps, ending with the last phase
    decay: str = "exp"
    train: dict = field(default_factory=dict)   # TrainConfig defaults for every phase (batch_size, seq_len, ...)


@dataclass
class Phase:
    name: str
    mixture: dict[str, float]        # corpus -> weight (renormalized over the corpora present)
    fraction: float = 0.0            # token budget as a fraction of schedule.total_tokens ...
    tokens: int = 0                  # ... or absolute
    init_from: str = ""              # phase whose final checkpoint this one continues ("" = fresh model)


PHASE_KEYS = {"mixture", "fraction", "tokens", "init_from", "description"}
SCHEDULE_KEYS = {"phases", "model", "schedule", "train"}
TRAIN_KEYS = {"batch_size", "grad_accum", "seq_len", "dtype", "weight_decay", "adam_beta1", "adam_beta2",
              "grad_clip", "eval_interval", "save_interval", "keep_last", "seed", "compile", "val_windows", "pack"}


def _check_keys(path: Path, table: dict, known: set, where: str = "") -> None:
    unknown = sorted(set(table) - known)
    if unknown:   # a typo must not be silently ignored
        raise ValueError(f"{path}: unknown key(s) {unknown}{' in ' + where if where else ''}; known: {sorted(known)}")


def load_schedule(config_dir) -> Schedule:
    path = Path(config_dir) / SCHEDULE_FILE
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    _check_keys(path, raw, SCHEDULE_KEYS)
    sched = raw.get("schedule", {})
    _check_keys(path, sched, {"total_tokens", "peak_lr", "min_lr", "warmup_fraction", "decay_fraction", "decay"},
                "[schedule]")
    _check_keys(path, raw.get("model", {}), {"preset"}, "[model]")
    _check_keys(path, raw.get("train", {}), TRAIN_KEYS, "[train]")
    if not raw.get("phases"):
        raise ValueError(f"{path}: `phases` (the curriculum order) is missing or empty")
    return Schedule(phases=list(raw["phases"]), preset=raw.get("model", {}).get("preset", "26m"),
                    train=dict(raw.get("train", {})), **sched)


def load_phase(config_dir, name: str) -> Phase:
    path = Path(config_dir) / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no phase config {path}")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    _check_keys(path, raw, PHASE_KEYS)
    if not raw.get("mixture"):
        raise ValueError(f"{path}: [mixture] is empty; give at least one corpus = weight")
    if bool(raw.get("fraction")) == bool(raw.get("tokens")):
        raise ValueError(f"{path}: give exactly one of `fraction` (of schedule.total_tokens) or `tokens`")
    if any(w < 0 for w in raw["mixture"].values()):
        raise ValueError(f"{path}: mixture weights must be >= 0")
    return Phase(name=name, mixture={k: float(v) for k, v in raw["mixture"].items()},
                 fraction=float(raw.get("fraction", 0)), tokens=int(raw.get("tokens", 0)),
                 init_from=raw.get("init_from", ""))


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
    val_chars_per_token: float       # manifest's val chars / val tokens, for bits per character


def open_corpus(data_dir: Path, name: str, tokenizer_sha256: str, min_tokens: int) -> Corpus | None:
    """Open data/pretrain/<name> by memmap. None (with a warning) when the corpus is absent or too small to
    draw one window from; an error when it was tokenized with another tokenizer."""
    root = Path(data_dir) / name
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        print(f"warning: corpus {name!r} not found ({manifest_path} missing); dropped from the mixture",
              file=sys.stderr)
        return None
    # finished, every listed shard consistent with its .idx, and made with this run's tokenizer (else ValueError)
    manifest = check_manifest(root, tokenizer_sha256)
    splits = manifest["splits"]
    train = [IndexedDataset(root / s) for s in splits.get("train", {}).get("shards", [])]
    train = [ds for ds in train if ds.num_tokens >= min_tokens]
    val = [ds for ds in (IndexedDataset(root / s) for s in splits.get("val", {}).get("shards", []))
           if ds.num_tokens >= min_tokens]
    if not train:
        print(f"warning: corpus {name!r} has no train shard of at least {min_tokens} tokens; dropped from the "
              f"mixture", file=sys.stderr)
        return None
    val_split = splits.get("val", {})
    cpt = val_split.get("chars", 0) / val_split["tokens"] if val_split.get("tokens") else 0.0
    return Corpus(name=name, train=train, val=val, val_chars_per_token=cpt)


def open_mixture(data_dir: Path, mixture: dict[str, float], tokenizer_sha256: str, seq_len: int,
                 phase: str = "") -> tuple[list[Corpus], np.ndarray]:
    """Open every corpus of a mixture; drop the missing ones (warned) and renormalize the weights."""
    corpora, weights = [], []
    for name, weight in mixture.items():
        if weight <= 0:
            continue
        corpus = open_corpus(data_dir, name, tokenizer_sha256, seq_len + 1)
        if corpus is not None:
            corpora.append(corpus)
            weights.append(weight)
    if not corpora:
        raise FileNotFoundError(f"phase {phase!r}: none of its corpora {sorted(mixture)} is in {data_dir} "
                                f"(run `python data_process.py` first, or edit config/pretrain/{phase}.toml)")
    weights = np.array(weights, dtype=np.float64) / sum(weights)
    if len(corpora) < sum(1 for w in mixture.values() if w > 0):
        print(f"phase {phase!r}: mixture renormalized over the corpora present: "
              + ", ".join(f"{c.name} {w:.3f}" for c, w in zip(corpora, weights)), file=sys.stderr)
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
            sizes = [ds.num_tokens - seq_len if pack else ds.num_tokens for ds in c.train]
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


def make_val_fn(corpora: list[Corpus], seq_len: int, n_windows: int, batch_size: int, device: str):
    """val_fn(model) -> {"val/<corpus>/loss", "val/<corpus>/bpc", "val/loss"} on fixed windows.

    Bits per character = summed token NLL (nats) / ln 2 / characters. The windows are a subset of the val
    split, so their characters are apportioned by the split's own ratio: chars = scored tokens * (manifest val
    chars / val tokens). That makes bpc comparable across tokenizers, which per-token loss is not."""
    windows = {c.name: val_windows(c, seq_len, n_windows) for c in corpora}
    for c in corpora:
        if not windows[c.name]:
            print(f"warning: corpus {c.name!r} has no val tokens; not validated",
                  file=sys.stderr)

    def val_fn(model) -> dict:
        out, total_nll, total_tokens = {}, 0.0, 0
        for c in corpora:
            ws = windows[c.name]
            if not ws:
                continue
            nll, count = 0.0, 0
            for i in range(0, len(ws), batch_size):
                chunk = torch.from_numpy(np.stack(ws[i:i + batch_size])).to(device)
                logits = model(chunk[:, :-1]).logits
                nll += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(),
                                       reduction="sum").item()
                count += chunk[:, 1:].numel()
            out[f"val/{c.name}/loss"] = nll / count
            if c.val_chars_per_token > 0:
                out[f"val/{c.name}/bpc"] = nll / math.log(2) / (count * c.val_chars_per_token)
            total_nll += nll
            total_tokens += count
        if total_tokens:
            out["val/loss"] = total_nll / total_tokens
        return out

    return val_fn


# ----------------------------------------------------------------------------- one phase

def build_config(args, schedule: Schedule) -> dict:
    """schedule.toml's [train], overridden by command-line flags that were given."""
    t = {"batch_size": 16, "grad_accum": 1, "seq_len": 512, "dtype": "bf16", "eval_interval": 200,
         "save_interval": 1000, "keep_last": 3, "seed": 1337, "compile": False, "val_windows": 32, "pack": True,
         **schedule.train}
    for key in ("batch_size", "grad_accum", "seq_len", "dtype", "eval_interval", "save_interval", "keep_last",
                "seed", "val_windows"):
        if getattr(args, key) is not None:
            t[key] = getattr(args, key)
    if args.compile:
        t["compile"] = True
    if args.within_doc:
        t["pack"] = False
    return t


def run_phase(name: str, args, schedule: Schedule) -> dict:
    from model import ModelConfig, Transformer, make_config
    from tokenizer import Tokenizer

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

    tokenizer = Tokenizer.load(args.tokenizer)
    corpora, weights = open_mixture(data_dir, phase.mixture, tokenizer.sha256, t["seq_len"], name)
    loader = MixtureLoader(corpora, weights, t["batch_size"], t["seq_len"], seed=t["seed"], rank=info.rank,
                           pack=t["pack"], pad_id=tokenizer.pad_id)

    out_dir = out_root / name
    own = checkpoint.latest_checkpoint(out_dir) if not args.no_resume else None
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
        base = make_config(preset, tokenizer.vocab_size)
        model_cfg = make_config(preset, tokenizer.vocab_size, max_seq_len=max(base.max_seq_len, t["seq_len"]))
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model vocab {model_cfg.vocab_size} != tokenizer vocab {tokenizer.vocab_size}")
    torch.manual_seed(t["seed"])     # identical initial weights on every rank and every run
    model = Transformer(model_cfg)

    cfg = train_loop.TrainConfig(
        out_dir=str(out_dir), total_steps=end_step, batch_size=t["batch_size"], grad_accum=t["grad_accum"],
        seq_len=t["seq_len"], lr=args.lr or schedule.peak_lr, min_lr=args.min_lr or schedule.min_lr,
        warmup_steps=plan.warmup_steps, stable_steps=plan.stable_steps, decay_steps=plan.decay_steps,
        decay=schedule.decay, weight_decay=t.get("weight_decay", 0.1), adam_beta1=t.get("adam_beta1", 0.9),
        adam_beta2=t.get("adam_beta2", 0.95), grad_clip=t.get("grad_clip", 1.0), dtype=t["dtype"],
        compile=t["compile"], device=args.device, eval_interval=t["eval_interval"],
        save_interval=t["save_interval"], keep_last=t["keep_last"], seed=t["seed"], resume=not args.no_resume,
        init_from=str(init_dir), progress=not args.no_progress, wandb_project=args.wandb or "",
        tensorboard=args.tensorboard,
        extra={"phase": name, "mixture": {c.name: float(w) for c, w in zip(corpora, weights)},
               "phase_steps": [start_step, plan.bounds[name][1]], "curriculum_steps": plan.total_steps,
               "tokens_per_step": tokens_per_step, "pack": t["pack"]})
    if info.is_main:
        print(f"phase {name}: steps {start_step}..{end_step} of {plan.total_steps} "
              f"({tokens_per_step:,} tokens/step, {(end_step - start_step) * tokens_per_step:,} tokens), "
              f"model {model.num_params() / 1e6:.1f}M params, {cfg.dtype} on {info.device} x{info.world_size}")
    val_fn = make_val_fn(corpora, t["seq_len"], t["val_windows"], t["batch_size"], info.device)
    return train_loop.train(cfg, model, tokenizer, loader, val_fn=val_fn,
                            meta={"kind": "base", "phase": name, "chat": False})


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
    p.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir or .model the shards were made with")
    p.add_argument("--out-dir", default="out/pretrain", help="checkpoints go to <out-dir>/<phase>/")
    p.add_argument("--preset", help="model preset for a fresh model (model.PRESETS: tiny, 26m, 100m, wide, deep, "
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        schedule = load_schedule(args.config_dir)
        if args.total_tokens:
            schedule.total_tokens = int(args.total_tokens)
        for name in (schedule.phases if args.all else [args.phase]):
            summary = run_phase(name, args, schedule)
            if train_loop.init_distributed(args.device).is_main:
                val = " ".join(f"{k}={v:.4f}" for k, v in summary["val"].items() if k.endswith(("bpc", "val/loss")))
                print(f"phase {name} done: step {summary['step']}, {summary['tokens_seen']:,} tokens, "
                      f"loss {summary['loss']:.4f} {val} -> {summary['final_dir']}")
    except (train_loop.TrainingDiverged, checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
