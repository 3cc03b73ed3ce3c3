"""Supervised fine-tuning: the staged SFT curriculum, LoRA stages and reasoning distillation.

    python sft.py general                       # one stage, from config/sft/general.toml
    python sft.py medical_dialogue --lora       # any stage as a LoRA stage (adapters only, base frozen)
    python sft.py merge --base CKPT --adapter DIR --out DIR      # fold a LoRA adapter into a full checkpoint
    sh script/sft.sh                            # every stage in curriculum order

Each stage reads `data/sft/<stage>.csv` (written by data_process/stage.py: columns id, source, system,
conversation = JSON list of turns ending with the assistant), renders every conversation with the one chat
template (`Tokenizer.render_chat`), and trains with loss only on assistant tokens, including the <|im_end|>
that teaches the model to stop; the reasoning stage gives the <think></think><answer></answer> tag tokens
extra weight (`tag_weight`). Batches are bucketed by length (no cross-example packing, so no example
attends to another) to keep padding small. Training goes through the one loop, `train_loop.train`
(resume after kill -9, metrics, plots, DDP, bf16); each stage starts from the previous stage's final
checkpoint and writes `out/sft/<stage>/final`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_process.stage import read_sft_conversations
from finetune import (IGNORE, add_train_args, bucket_batches, check_init_from, fit_seq_len, load_config,
                      cli_overrides, make_train_config, pad_length, run_cli)
from settings import limits

log = logging.getLogger("sft")



# ------------------------------------------------------------------------------------------------ data: CSV rows

# -------------------------------------------------------------------------------------------- data: tokenized set

@dataclass
class TokenizedSet:
    """Conversations as one flat id array + per-token loss weights, with offsets (no Python list per example)."""
    ids: np.ndarray        # int32 [total]
    weights: np.ndarray    # float32 [total]
    offsets: np.ndarray    # int64 [n + 1]
    rejects: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.weights[a:b]


def render_all(tokenizer, conversations, tag_weight: float, chunk: int = 1024):
    """render_chat of every conversation, a chunk at a time through render_chat_batch (SentencePiece's thread
    pool); a chunk holding a malformed conversation is redone one by one, yielding the error for the bad one."""
    for start in range(0, len(conversations), chunk):
        part = conversations[start:start + chunk]
        try:
            yield from tokenizer.render_chat_batch(part, tag_weight=tag_weight)
        except (ValueError, TypeError):
            for messages in part:
                try:
                    yield tokenizer.render_chat(messages, tag_weight=tag_weight)
                except (ValueError, TypeError) as e:
                    yield e


def tokenize_conversations(tokenizer, conversations, max_tokens: int, tag_weight: float = 1.0,
                           rejects: dict | None = None) -> TokenizedSet:
    """render_chat every conversation; drop (and count) those longer than max_tokens + 1 ids or with no
    assistant token. Over-long examples are dropped, not truncated: a cut answer loses its <|im_end|> and
    would teach the model not to stop."""
    rejects = dict(rejects or {})
    ids, weights, offsets = [], [], [0]
    for chat in render_all(tokenizer, conversations, tag_weight):
        if isinstance(chat, Exception):
            rejects["bad_messages"] = rejects.get("bad_messages", 0) + 1
            log.warning("conversation rejected: %s", chat)
            continue
        if len(chat.ids) > max_tokens + 1:
            rejects["too_long"] = rejects.get("too_long", 0) + 1
            continue
        if not any(w > 0 for w in chat.weights[1:]):
            rejects["no_assistant_tokens"] = rejects.get("no_assistant_tokens", 0) + 1
            continue
        ids.append(np.asarray(chat.ids, dtype=np.int32))
        weights.append(np.asarray(chat.weights, dtype=np.float32))
        offsets.append(offsets[-1] + len(chat.ids))
    if not ids:
        raise ValueError(f"no usable SFT example (rejects: {rejects})")
    return TokenizedSet(np.concatenate(ids), np.concatenate(weights), np.asarray(offsets, dtype=np.int64), rejects)


def load_sft_set(tokenizer, csv_path, max_tokens: int, tag_weight: float = 1.0, cache_dir=None) -> TokenizedSet:
    """read_sft_conversations + tokenize_conversations, cached as .npz in cache_dir (keyed by the CSV's bytes, the
    tokenizer and the settings) so a resumed or repeated run does not re-tokenize."""
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256()
        key.update(Path(csv_path).read_bytes())
        key.update(f"{tokenizer.sha256}|{max_tokens}|{tag_weight}|sft-v1".encode())
        cache = Path(cache_dir) / f"tokens-{Path(csv_path).stem}-{key.hexdigest()[:16]}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            return TokenizedSet(z["ids"], z["weights"], z["offsets"], json.loads(str(z["rejects"])))
    conversations, rejects = read_sft_conversations(csv_path)
    data = tokenize_conversations(tokenizer, conversations, max_tokens, tag_weight, rejects)
    log.info("%s: %d examples, %d tokens, rejected %s", csv_path, len(data), len(data.ids), data.rejects or "none")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, ids=data.ids, weights=data.weights, offsets=data.offsets,
                 rejects=np.asarray(json.dumps(data.rejects)))
        tmp.replace(cache)
    return data


# ---------------------------------------------------------------------------------------------- data: batching

class SFTBatches:
    """The `batches` object for train_loop.train: next_batch(step, micro_step) -> {input_ids, targets,
    loss_weights}, a pure function of (seed, step, micro_step, rank), so resume needs no loader state.

    Targets are the ids shifted by one; a target's weight is the weight of the token it predicts, and
    targets with weight 0 (system/user turns, role markers, padding) are IGNORE.
    """

    def __init__(self, data: TokenizedSet, batch_size: int, pad_id: int, *, seed: int = 0, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, pad_multiple: int = 8, bucket_batches: int = 64):
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.seed, self.grad_accum, self.rank, self.world_size = seed, grad_accum, rank, world_size
        self.pad_multiple, self.bucket_batches = pad_multiple, bucket_batches
        self.lengths = data.lengths - 1          # input length of each example (ids minus the last)
        self.batches_per_epoch = max(1, len(data) // batch_size)
        self._plans: dict[int, list[np.ndarray]] = {}

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            self._plans = {epoch: bucket_batches(self.lengths, self.batch_size,
                                                 np.random.default_rng([self.seed, epoch]), self.bucket_batches)}
        return self._plans[epoch]

    def steps_per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // (self.grad_accum * self.world_size))

    def indices(self, step: int, micro_step: int) -> np.ndarray:
        g = (step * self.grad_accum + micro_step) * self.world_size + self.rank
        return self.plan(g // self.batches_per_epoch)[g % self.batches_per_epoch]

    def collate(self, indices) -> dict[str, torch.Tensor]:
        T = pad_length(int(self.lengths[indices].max()), self.pad_multiple)
        B = len(indices)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        weights = np.zeros((B, T), dtype=np.float32)
        for row, i in enumerate(indices):
            ids, w = self.data.example(int(i))
            n = len(ids) - 1
            input_ids[row, :n] = ids[:-1]
            targets[row, :n] = np.where(w[1:] > 0, ids[1:], IGNORE)
            weights[row, :n] = w[1:]
        return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
                "loss_weights": torch.from_numpy(weights)}

    def next_batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        return self.collate(self.indices(step, micro_step))

    def padding_fraction(self, n_batches: int | None = None) -> float:
        """Share of batch positions that are padding, over the first n_batches of epoch 0 (all by default)."""
        plan = self.plan(0)[:n_batches]
        real = sum(int(self.lengths[b].sum()) for b in plan)
        total = sum(len(b) * pad_length(int(self.lengths[b].max()), self.pad_multiple) for b in plan)
        return 1.0 - real / total

    # nothing to restore: batches are a function of the step; the fingerprint guards against a changed data set
    def state_dict(self) -> dict:
        return {"seed": self.seed, "examples": len(self.data), "tokens": int(len(self.data.ids))}

    def load_state_dict(self, state: dict) -> None:
        if state and state != self.state_dict():
            raise ValueError(f"resuming on different SFT data or seed: checkpoint {state}, now {self.state_dict()}")


# ------------------------------------------------------------------------------------------------- stage config

@dataclass
class StageConfig:
    """One SFT stage, from config/sft/<stage>.toml. [train] holds train_loop.TrainConfig fields; the schedule
    steps are derived from epochs and the fractions below unless [train] sets them."""
    stage: str
    data: str                                  # staged CSV
    init_from: str                             # checkpoint dir to start from (previous stage's final)
    out_dir: str = ""                          # default out/sft/<stage>
    val_data: str = ""                         # optional; a missing file only skips validation
    epochs: float = field(default=1.0, metadata=limits(gt=0))   # used when [train] total_steps is not given
    warmup_fraction: float = field(default=0.03, metadata=limits(ge=0, le=1))
    decay_fraction: float = field(default=0.2, metadata=limits(ge=0, le=1))   # WSD: the last part decays
    tag_weight: float = field(default=1.0, metadata=limits(ge=0))   # loss weight of the think/answer tags
    max_val_examples: int = field(default=512, metadata=limits(ge=0))
    pad_multiple: int = field(default=8, metadata=limits(ge=1))
    lora: dict | None = None                   # lora.LoraSettings fields; present = a LoRA stage
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = self.out_dir or f"out/sft/{self.stage}"


# ------------------------------------------------------------------------------------------------- running a stage

def make_val_fn(data: TokenizedSet | None, pad_id: int, name: str, batch_size: int, max_examples: int):
    """val_fn(model) -> {"<name>/loss": weighted assistant-token loss over the (first max_examples) val set}."""
    if data is None:
        return None
    n = min(len(data), max_examples)
    batcher = SFTBatches(data, batch_size, pad_id, pad_multiple=1)
    order = np.argsort(batcher.lengths[:n], kind="stable")

    def val_fn(model) -> dict:
        device = next(model.parameters()).device
        total, weight = 0.0, 0.0
        for start in range(0, n, batch_size):
            batch = {k: v.to(device) for k, v in batcher.collate(order[start:start + batch_size]).items()}
            out = model(batch["input_ids"], targets=batch["targets"], loss_weights=batch["loss_weights"])
            w = float(batch["loss_weights"].sum())
            total += float(out.loss) * w
            weight += w
        return {f"{name}/loss": total / max(weight, 1e-8)}

    return val_fn


def stage_done(out_dir) -> bool:
    """A LoRA stage whose final checkpoint already holds the merged model (the loop cannot resume from it)."""
    meta = Path(out_dir) / "final" / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("lora_merged", False)


def run_stage(cfg: StageConfig) -> dict:
    """One SFT stage with its out dir locked (train_loop.rank0_lock) from before its data caches are written until
    it ends: a second run on the same out dir is refused, naming this one."""
    from train_loop import rank0_lock
    with rank0_lock(cfg.out_dir):
        return _run_stage_locked(cfg)


def _run_stage_locked(cfg: StageConfig) -> dict:
    """Train one SFT stage through train_loop.train; returns the loop's summary (+ data and padding figures)."""
    from checkpoint import data_provenance, load_checkpoint, provenance_chain, save_checkpoint, verify_checkpoint
    from train_loop import dist_env, train
    out_dir = Path(cfg.out_dir)
    if stage_done(out_dir):
        print(f"{out_dir}/final already holds the merged LoRA model; nothing to train")
        return {"final_dir": str(out_dir / "final"), "skipped": True}
    check_init_from(cfg.init_from, "train the previous stage first: `sh script/pretrain.sh converge` before the "
                                   "first SFT stage, `sh script/sft.sh` runs the stages in order")
    model, tokenizer, init_meta = load_checkpoint(cfg.init_from)
    train_table = dict(cfg.train)
    max_tokens = fit_seq_len(train_table, model)
    data = load_sft_set(tokenizer, cfg.data, max_tokens, cfg.tag_weight, cache_dir=out_dir / "data")
    val = None
    if cfg.val_data and Path(cfg.val_data).is_file():
        val = load_sft_set(tokenizer, cfg.val_data, max_tokens, cfg.tag_weight, cache_dir=out_dir / "data")
    batch_size = int(train_table.get("batch_size", 8))
    grad_accum = int(train_table.get("grad_accum", 1))
    env = dist_env()
    batches = SFTBatches(data, batch_size, tokenizer.pad_id, seed=int(train_table.get("seed", 1337)),
                         grad_accum=grad_accum, rank=env.rank, world_size=env.world_size, pad_multiple=cfg.pad_multiple)
    total_steps = int(train_table.get("total_steps") or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))
    padding = batches.padding_fraction()
    settings = None
    if cfg.lora is not None:
        import lora as lora_lib   # peft (and transformers) load only for LoRA stages
        settings = lora_lib.LoraSettings(**cfg.lora)
    extra = {"stage": cfg.stage, "data": str(cfg.data), "examples": len(data), "rejects": data.rejects,
             "padding_fraction": round(padding, 4), "tag_weight": cfg.tag_weight, "init_from": str(cfg.init_from),
             "lora": asdict(settings) if settings else None}
    train_cfg = make_train_config(train_table, str(out_dir), total_steps, cfg.warmup_fraction, cfg.decay_fraction,
                                  extra)
    print(f"sft {cfg.stage}: {len(data):,} examples ({data.rejects or 'no rejects'}), {total_steps} steps, "
          f"padding {padding:.1%} of batch positions, from {cfg.init_from}"
          + (f", LoRA r={settings.rank} on {settings.targets}" if settings else ""))
    if settings is not None:
        torch.manual_seed(train_cfg.seed)   # peft draws lora_A at random: the same run must start the same
        lora_lib.add_lora(model, settings)
        n_train = sum(p.numel() for p in lora_lib.lora_parameters(model))
        print(f"LoRA: {n_train:,} trainable parameters ({n_train / model.num_params():.2%} of the base)")
    meta = {"kind": "sft", "stage": cfg.stage, "chat": True, "init_from": str(cfg.init_from)}
    meta["provenance"] = provenance_chain(init_meta, data_provenance(f"sft {cfg.stage}", cfg.data))
    val_fn = make_val_fn(val, tokenizer.pad_id, cfg.stage, batch_size, cfg.max_val_examples)
    summary = train(train_cfg, model, tokenizer, batches, val_fn=val_fn, meta=meta,
                    trainable_params=lora_lib.lora_parameters(model) if settings else None)
    if settings is not None and env.is_main:
        # the loop's final holds LoRA-named weights (what it resumes from); replace it by the adapter alone
        # (peft format, out/sft/<stage>/adapter) and the merged full model as a normal checkpoint
        final = Path(summary["final_dir"])
        loop_meta = verify_checkpoint(final)
        adapter_dir = lora_lib.save_adapter(model.cpu(), settings, out_dir / "adapter", base=str(cfg.init_from))
        lora_lib.merge_lora(model)
        keep = {k: v for k, v in loop_meta.items()
                if k not in ("files", "format", "tokenizer_sha256", "param_sha256")}
        save_checkpoint(final, model, tokenizer, {**keep, "lora_merged": True, "adapter": str(adapter_dir)})
        print(f"LoRA adapter saved to {adapter_dir}; merged model in {final}")
    summary.update(examples=len(data), padding_fraction=padding, rejects=data.rejects)
    return summary


def load_stage_config(stage_or_path: str, config_dir="config/sft", overrides: list[str] | None = None
                      ) -> StageConfig:
    return load_config(StageConfig, stage_or_path, config_dir, overrides, "stage", "SFT stage")


# ------------------------------------------------------------------------------------------------------- merge

def merge_adapter(base_dir, adapter_dir, out_dir) -> Path:
    """Fold a saved LoRA adapter into its base checkpoint and write a full checkpoint (kind "sft", chat)."""
    from checkpoint import load_checkpoint, save_checkpoint
    import lora as lora_lib
    model, tokenizer, meta = load_checkpoint(base_dir)
    lora_lib.load_adapter(model, adapter_dir)
    lora_lib.merge_lora(model)
    keep = {k: v for k, v in meta.items() if k not in ("files", "format", "tokenizer_sha256", "train_config")}
    keep.update(kind="sft", chat=True, lora_merged=True, adapter=str(adapter_dir), base=str(base_dir))
    return save_checkpoint(out_dir, model, tokenizer, keep)


# -------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Supervised fine-tuning, one curriculum stage per call (config/sft/<stage>.toml), "
                    "or `merge` to fold a LoRA adapter into a full checkpoint.",
        epilog="examples:\n  python sft.py general\n  python sft.py medical_dialogue --lora --lora-rank 8\n"
               "  python sft.py reasoning --set tag_weight=3 --set train.lr=1e-4\n"
               "  python sft.py merge --base out/sft/medical/final --adapter out/sft/medical_dialogue/adapter "
               "--out out/sft/merged",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", help="stage name (config/sft/<stage>.toml), a .toml path, or `merge`")
    p.add_argument("--config-dir", default="config/sft", help="where stage configs live (default config/sft)")
    p.add_argument("--data", help="staged SFT CSV (default: the config's)")
    p.add_argument("--init-from", help="checkpoint dir to start from (default: the config's)")
    p.add_argument("--out-dir", help="output dir (default out/sft/<stage>)")
    add_train_args(p)
    lo = p.add_argument_group("LoRA (Hu et al. 2021)")
    lo.add_argument("--lora", action="store_true", help="train LoRA adapters only (base frozen)")
    lo.add_argument("--no-lora", action="store_true", help="full fine-tuning even if the config has [lora]")
    lo.add_argument("--lora-rank", type=int)
    lo.add_argument("--lora-alpha", type=float)
    lo.add_argument("--lora-dropout", type=float)
    lo.add_argument("--lora-targets", help="comma list of q,k,v,o,gate,up,down")
    mg = p.add_argument_group("merge")
    mg.add_argument("--base", help="merge: base checkpoint dir")
    mg.add_argument("--adapter", help="merge: adapter dir (adapter_model.safetensors + adapter_config.json)")
    mg.add_argument("--out", help="merge: output checkpoint dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.stage == "merge":
        if not (args.base and args.adapter and args.out):
            print("merge needs --base, --adapter and --out", file=sys.stderr)
            return 2
        print(f"merged checkpoint written to {merge_adapter(args.base, args.adapter, args.out)}")
        return 0
    overrides = cli_overrides(args)

    def job():
        cfg = load_stage_config(args.stage, args.config_dir, overrides)
        if args.no_lora:
            cfg.lora = None
        elif args.lora or cfg.lora is not None:
            lora = dict(cfg.lora or {})
            for key, value in (("rank", args.lora_rank), ("alpha", args.lora_alpha),
                               ("dropout", args.lora_dropout), ("targets", args.lora_targets)):
                if value is not None:
                    lora[key] = value
            cfg.lora = lora
        return run_stage(cfg)
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
