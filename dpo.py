"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) on the staged preference pairs.

    python dpo.py general                      # config/dpo/general.toml -> out/dpo/general/final
    sh script/dpo.sh                           # every config in order

Data: `data/dpo/<name>.jsonl` lines {id, source, prompt: [messages ending with user], chosen, rejected}
(data_process/stage.py). Each side is rendered with the one chat template (`Tokenizer.render_chat`); its log-prob
is summed over the response tokens only (the assistant content and its <|im_end|>, where render_chat puts loss
weight), never over the prompt or padding.

Loss: -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))). The reference is the
frozen starting checkpoint; its log-probs are computed once, before training, and cached on disk next to the run
(`<out_dir>/ref_logps/<key>.safetensors`, key = hash of the data, the reference weights, the tokenizer and the
length limit), so training runs one model instead of two. Logged: loss, reward margin and accuracy,
chosen/rejected log-probs and rewards. Training goes through train_loop.train (resume after kill -9, metrics, DDP).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_process.stage import read_dpo_pairs
from model import TokenNLL
from finetune import (IGNORE, add_train_args, bucket_batches, check_init_from, fit_seq_len, load_config,
                      cli_overrides, make_train_config, pad_length, run_cli)
from settings import limits

log = logging.getLogger("dpo")
CACHE_VERSION = "dpo-ref-v1"


# ---------------------------------------------------------------------------------------------------- data

@dataclass
class PreferenceSet:
    """Tokenized pairs: side 0 = chosen, side 1 = rejected; each a full chat (prompt + response) with a
    response mask (1 on the tokens whose log-prob counts)."""
    ids: list[list[np.ndarray]]      # [side][pair] int32
    masks: list[list[np.ndarray]]    # [side][pair] bool, aligned with ids
    pair_ids: list[str]
    rejects: dict
    digest: str                      # sha256 of the tokenized pairs: part of the reference cache key

    def __len__(self) -> int:
        return len(self.pair_ids)

    def head(self, n: int) -> "PreferenceSet":
        """The first n pairs (e.g. a bounded validation set); its digest says so."""
        if n >= len(self):
            return self
        return PreferenceSet([s[:n] for s in self.ids], [s[:n] for s in self.masks], self.pair_ids[:n],
                             self.rejects, f"{self.digest}|head{n}")

    @property
    def lengths(self) -> np.ndarray:
        """Input length of a pair: the longer side minus one (targets are shifted)."""
        return np.array([max(len(c), len(r)) - 1 for c, r in zip(*self.ids)], dtype=np.int64)


def tokenize_pairs(tokenizer, records, max_tokens: int, rejects: dict | None = None) -> PreferenceSet:
    """Render prompt + chosen and prompt + rejected; drop (count) pairs that are too long, identical or bad."""
    rejects = dict(rejects or {})
    ids, masks, pair_ids = [[], []], [[], []], []
    h = hashlib.sha256()
    for r in records:
        try:
            sides = [tokenizer.render_chat(r["prompt"] + [{"role": "assistant", "content": r[k]}])
                     for k in ("chosen", "rejected")]
        except (ValueError, TypeError) as e:
            rejects["bad_messages"] = rejects.get("bad_messages", 0) + 1
            log.warning("pair %s rejected: %s", r["id"], e)
            continue
        reason = None
        if max(len(s.ids) for s in sides) > max_tokens + 1:
            reason = "too_long"
        elif sides[0].ids == sides[1].ids:
            reason = "chosen_equals_rejected"
        if reason:
            rejects[reason] = rejects.get(reason, 0) + 1
            continue
        for side, chat in enumerate(sides):
            a = np.asarray(chat.ids, dtype=np.int32)
            m = np.asarray(chat.weights, dtype=np.float32) > 0
            ids[side].append(a)
            masks[side].append(m)
            h.update(a.tobytes())
            h.update(m.tobytes())
        pair_ids.append(r["id"])
    if not pair_ids:
        raise ValueError(f"no usable preference pair (rejects: {rejects})")
    return PreferenceSet(ids, masks, pair_ids, rejects, h.hexdigest())


def load_pairs(tokenizer, patterns, max_tokens: int) -> PreferenceSet:
    paths = expand(patterns)
    records, rejects = read_dpo_pairs(paths)
    data = tokenize_pairs(tokenizer, records, max_tokens, rejects)
    log.info("%s: %d pairs, rejected %s", [str(p) for p in paths], len(data), data.rejects or "none")
    return data


def expand(patterns) -> list[Path]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = sorted({Path(p) for pat in patterns for p in glob.glob(str(pat))})
    if not paths:
        raise FileNotFoundError(f"no DPO data matches {patterns} (run `python data_process.py` to stage it)")
    return paths


def collate_pairs(data: PreferenceSet, indices, pad_id: int, pad_multiple: int = 8) -> dict[str, torch.Tensor]:
    """[2B, T] batch: rows 0..B-1 the chosen sides, B..2B-1 the rejected sides of the same pairs. targets are
    the next ids on response tokens and IGNORE elsewhere (prompt, role markers, padding)."""
    rows = [(side, int(i)) for side in (0, 1) for i in indices]
    T = pad_length(max(len(data.ids[s][i]) - 1 for s, i in rows), pad_multiple)
    input_ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    targets = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for r, (s, i) in enumerate(rows):
        ids, mask = data.ids[s][i], data.masks[s][i]
        n = len(ids) - 1
        input_ids[r, :n] = ids[:-1]
        targets[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
    return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
            "pair_index": torch.as_tensor(np.asarray(indices, dtype=np.int64))}


class DPOBatches:
    """`batches` for train_loop.train: pairs bucketed by length, a pure function of (seed, step, micro_step,
    rank). With a reference cache, each batch carries the cached ref_logps [2B] (chosen then rejected)."""

    def __init__(self, data: PreferenceSet, batch_size: int, pad_id: int, *, ref_logps: torch.Tensor | None = None,
                 seed: int = 0, grad_accum: int = 1, rank: int = 0, world_size: int = 1, pad_multiple: int = 8):
        self.data, self.batch_size, self.pad_id, self.ref_logps = data, batch_size, pad_id, ref_logps
        self.seed, self.grad_accum, self.rank, self.world_size = seed, grad_accum, rank, world_size
        self.pad_multiple = pad_multiple
        self.lengths = data.lengths
        self.batches_per_epoch = max(1, len(data) // batch_size)
        self._plans: dict[int, list[np.ndarray]] = {}

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            self._plans = {epoch: bucket_batches(self.lengths, self.batch_size,
                                                 np.random.default_rng([self.seed, epoch, 7]))}
        return self._plans[epoch]

    def steps_per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // (self.grad_accum * self.world_size))

    def next_batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        g = (step * self.grad_accum + micro_step) * self.world_size + self.rank
        indices = self.plan(g // self.batches_per_epoch)[g % self.batches_per_epoch]
        batch = collate_pairs(self.data, indices, self.pad_id, self.pad_multiple)
        if self.ref_logps is not None:
            idx = batch["pair_index"]
            batch["ref_logps"] = torch.cat([self.ref_logps[idx, 0], self.ref_logps[idx, 1]])
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "pairs": len(self.data), "digest": self.data.digest}

    def load_state_dict(self, state: dict) -> None:
        if state and state != self.state_dict():
            raise ValueError(f"resuming on different DPO data or seed: checkpoint {state}, now {self.state_dict()}")


# ---------------------------------------------------------------------------------------------------- loss

def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over the non-IGNORE targets of each row [rows] in fp32, the model's MoE aux loss)."""
    out = model(input_ids)
    # model.TokenNLL: fp32 log-sum-exp without an fp32 copy of the [rows*T, V] logits (the big vocabulary makes
    # those the largest tensors of a DPO step); same values as F.cross_entropy
    nll = TokenNLL.apply(out.logits.flatten(0, 1), targets.flatten().clamp_min(0)).view(targets.shape)
    return -(nll * (targets != IGNORE)).sum(-1), out.aux_loss


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, eq. 7) on [2B] log-probs laid out chosen-then-rejected."""
    B = policy_logps.shape[0] // 2
    chosen_reward = beta * (policy_logps[:B] - ref_logps[:B])
    rejected_reward = beta * (policy_logps[B:] - ref_logps[B:])
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {"reward_margin": margin.mean().detach(), "reward_accuracy": (margin > 0).float().mean().detach(),
               "reward_chosen": chosen_reward.mean().detach(), "reward_rejected": rejected_reward.mean().detach(),
               "logp_chosen": policy_logps[:B].mean().detach(), "logp_rejected": policy_logps[B:].mean().detach()}
    return loss, metrics


@torch.no_grad()
def reference_logps(ref_model, batch: dict) -> torch.Tensor:
    """The reference's summed response log-probs, in fp32 whatever autocast is active (the cache holds these)."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, enabled=False):
        return sequence_logps(ref_model, batch["input_ids"], batch["targets"])[0]


def make_loss_fn(beta: float, ref_model=None):
    """loss_fn(model, batch) for train_loop: cached batch["ref_logps"] if present, else runs `ref_model`."""

    def loss_fn(model, batch):
        policy, aux_loss = sequence_logps(model, batch["input_ids"], batch["targets"])
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif ref_model is not None:
            ref = reference_logps(ref_model, batch)
        else:
            raise ValueError("DPO needs cached ref_logps in the batch or a reference model")
        loss, metrics = dpo_loss(policy, ref, beta)
        return loss + aux_loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------- reference cache

def cache_key(data: PreferenceSet, ref_ckpt_dir, tokenizer) -> str:
    """Hash of what the reference log-probs depend on: the tokenized pairs (data, template, length limit) and
    the reference weights (their sha256 as recorded in the checkpoint's meta.json, or hashed here)."""
    ref_ckpt_dir = Path(ref_ckpt_dir)
    meta_path = ref_ckpt_dir / "meta.json"
    weights_sha = None
    if meta_path.is_file():
        weights_sha = json.loads(meta_path.read_text()).get("files", {}).get("model.safetensors", {}).get("sha256")
    if weights_sha is None:
        weights_sha = hashlib.sha256((ref_ckpt_dir / "model.safetensors").read_bytes()).hexdigest()
    h = hashlib.sha256(f"{CACHE_VERSION}|{data.digest}|{weights_sha}|{tokenizer.sha256}".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(ref_model, data: PreferenceSet, pad_id: int, batch_size: int = 8,
                            device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed response log-probs of every pair under the reference, in fp32."""
    was_training = ref_model.training
    ref_model.eval()
    out = torch.empty(len(data), 2, dtype=torch.float32)
    order = np.argsort(data.lengths, kind="stable")          # similar lengths together: little padding
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="reference log-probs", dynamic_ncols=True, file=sys.stdout)
    for idx in chunks:
        batch = {k: v.to(device) for k, v in collate_pairs(data, idx, pad_id).items()}
        logps = reference_logps(ref_model, batch).cpu()
        out[torch.as_tensor(idx), 0] = logps[:len(idx)]
        out[torch.as_tensor(idx), 1] = logps[len(idx):]
    ref_model.train(was_training)
    return out


def cached_reference_logps(ref_model, data: PreferenceSet, ref_ckpt_dir, tokenizer, cache_dir, *,
                           batch_size: int = 8, device: str = "cpu", write: bool = True) -> torch.Tensor:
    """Load the reference log-probs from cache_dir/<key>.safetensors, or compute and store them (atomically)."""
    from safetensors.torch import load_file, save

    from fileio import atomic_write_bytes
    key = cache_key(data, ref_ckpt_dir, tokenizer)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        logps = load_file(str(path))["logps"]
        if logps.shape == (len(data), 2):
            print(f"reference log-probs: cached {path}")
            return logps
        log.warning("%s has shape %s, expected (%d, 2); recomputing", path, tuple(logps.shape), len(data))
    print(f"reference log-probs: computing for {len(data):,} pairs (once; cached in {path})")
    logps = compute_reference_logps(ref_model, data, tokenizer.pad_id, batch_size, device, progress=True)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"logps": logps.contiguous()}, metadata={
            "reference": str(ref_ckpt_dir), "pairs": str(len(data)), "data_digest": data.digest}))
    return logps


# ---------------------------------------------------------------------------------------------------- run

@dataclass
class DPOConfig:
    """One DPO run, from config/dpo/<name>.toml; [train] holds train_loop.TrainConfig fields."""
    name: str
    data: list[str] | str = field(default_factory=list)   # JSONL files or globs
    init_from: str = ""                         # policy start = the frozen reference
    out_dir: str = ""                           # default out/dpo/<name>
    val_data: list[str] | str = field(default_factory=list)
    beta: float = field(default=0.1, metadata=limits(gt=0))
    epochs: float = field(default=1.0, metadata=limits(gt=0))
    warmup_fraction: float = field(default=0.1, metadata=limits(ge=0, le=1))
    decay_fraction: float = field(default=0.2, metadata=limits(ge=0, le=1))
    ref_cache: bool = True                      # false: run the reference model every step (the slow way)
    max_val_pairs: int = field(default=256, metadata=limits(ge=0))
    pad_multiple: int = field(default=8, metadata=limits(ge=1))
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = self.out_dir or f"out/dpo/{self.name}"
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        self.val_data = [self.val_data] if isinstance(self.val_data, str) else list(self.val_data)
        if not self.data:
            raise ValueError(f"DPO run {self.name!r}: no data given")


def make_val_fn(data: PreferenceSet | None, ref_logps, pad_id: int, beta: float, batch_size: int, name: str):
    if data is None:
        return None

    def val_fn(model) -> dict:
        device = next(model.parameters()).device
        totals, n = {}, 0
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            batch = {k: v.to(device) for k, v in collate_pairs(data, idx, pad_id).items()}
            policy, _ = sequence_logps(model, batch["input_ids"], batch["targets"])
            ref = torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]]).to(device)
            loss, metrics = dpo_loss(policy, ref, beta)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
            n += len(idx)
        return {f"{name}/{k}": v / n for k, v in totals.items()}

    return val_fn


def run_dpo(cfg: DPOConfig) -> dict:
    """One DPO run with its out dir locked (train_loop.rank0_lock) from before its data caches are written until
    it ends: a second run on the same out dir is refused, naming this one."""
    from train_loop import rank0_lock
    with rank0_lock(cfg.out_dir):
        return _run_dpo_locked(cfg)


def _run_dpo_locked(cfg: DPOConfig) -> dict:
    """Train one DPO run through train_loop.train; returns the loop's summary."""
    import copy
    from checkpoint import data_provenance, load_checkpoint, provenance_chain
    from train_loop import dist_env, resolve_device, train
    if not cfg.init_from:
        raise ValueError(f"DPO run {cfg.name!r}: init_from (the starting/reference checkpoint) is required")
    check_init_from(cfg.init_from, "run `sh script/sft.sh` first; each DPO config names the run it starts from")
    out_dir = Path(cfg.out_dir)
    model, tokenizer, init_meta = load_checkpoint(cfg.init_from)
    train_table = dict(cfg.train)
    max_tokens = fit_seq_len(train_table, model)
    data = load_pairs(tokenizer, cfg.data, max_tokens)
    val = None
    if cfg.val_data and any(glob.glob(str(p)) for p in cfg.val_data):
        val = load_pairs(tokenizer, cfg.val_data, max_tokens)
        val = val.head(cfg.max_val_pairs)
    batch_size = int(train_table.get("batch_size", 8))
    device = resolve_device(train_table.get("device", "auto"))
    env = dist_env()
    is_main = env.is_main
    ref_model, ref_logps, val_ref = None, None, None
    if cfg.ref_cache or val is not None:
        model.to(device)   # `model` is still the starting checkpoint = the reference
        cache_dir = out_dir / "ref_logps"
        if cfg.ref_cache:
            ref_logps = cached_reference_logps(model, data, cfg.init_from, tokenizer, cache_dir,
                                               batch_size=batch_size, device=device, write=is_main)
        if val is not None:
            val_ref = cached_reference_logps(model, val, cfg.init_from, tokenizer, cache_dir,
                                             batch_size=batch_size, device=device, write=is_main)
    if not cfg.ref_cache:
        ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    batches = DPOBatches(data, batch_size, tokenizer.pad_id, ref_logps=ref_logps,
                         seed=int(train_table.get("seed", 1337)), grad_accum=int(train_table.get("grad_accum", 1)),
                         rank=env.rank, world_size=env.world_size,
                         pad_multiple=cfg.pad_multiple)
    total_steps = int(train_table.get("total_steps") or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))
    extra = {"name": cfg.name, "data": [str(p) for p in expand(cfg.data)], "pairs": len(data),
             "rejects": data.rejects, "beta": cfg.beta, "ref_cache": cfg.ref_cache, "init_from": str(cfg.init_from)}
    train_cfg = make_train_config(train_table, str(out_dir), total_steps, cfg.warmup_fraction, cfg.decay_fraction,
                                  extra)
    print(f"dpo {cfg.name}: {len(data):,} pairs ({data.rejects or 'no rejects'}), beta {cfg.beta}, "
          f"{total_steps} steps, reference {'cached' if cfg.ref_cache else 'run every step'}, from {cfg.init_from}")
    meta = {"kind": "dpo", "stage": cfg.name, "chat": True, "init_from": str(cfg.init_from), "beta": cfg.beta}
    meta["provenance"] = provenance_chain(init_meta, data_provenance(f"dpo {cfg.name}", expand(cfg.data)[0]))
    val_fn = make_val_fn(val, val_ref, tokenizer.pad_id, cfg.beta, batch_size, f"dpo_{cfg.name}")
    summary = train(train_cfg, model, tokenizer, batches, loss_fn=make_loss_fn(cfg.beta, ref_model),
                    val_fn=val_fn, meta=meta)
    summary.update(pairs=len(data), rejects=data.rejects)
    return summary


def load_dpo_config(name_or_path: str, config_dir="config/dpo", overrides: list[str] | None = None) -> DPOConfig:
    return load_config(DPOConfig, name_or_path, config_dir, overrides, "name", "DPO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Direct Preference Optimization (Rafailov et al. 2023) on data/dpo/*.jsonl, with the "
                    "reference log-probs computed once and cached.",
        epilog="examples:\n  python dpo.py general\n  python dpo.py medical --set beta=0.2 --set train.lr=5e-7\n"
               "  python dpo.py general --no-ref-cache     # run the reference every step (slower)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="run name (config/dpo/<name>.toml) or a .toml path")
    p.add_argument("--config-dir", default="config/dpo")
    p.add_argument("--data", action="append", help="DPO JSONL file or glob (repeatable; default: the config's)")
    p.add_argument("--init-from", help="starting = reference checkpoint (default: the config's)")
    p.add_argument("--out-dir", help="output dir (default out/dpo/<name>)")
    p.add_argument("--beta", type=float, help="DPO beta (default: the config's)")
    p.add_argument("--no-ref-cache", action="store_true", help="run the reference model every step instead")
    add_train_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = cli_overrides(args, ("data", "init_from", "out_dir", "beta"))
    if args.no_ref_cache:
        overrides.append("ref_cache=false")
    return run_cli(lambda: run_dpo(load_dpo_config(args.name, args.config_dir, overrides)))


if __name__ == "__main__":
    sys.exit(main())
