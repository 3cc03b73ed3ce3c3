"""Group Relative Policy Optimization with verifiable rewards (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300),
through the one training loop.

    python grpo.py medical_choice                    # config/grpo/medical_choice.toml -> out/grpo/medical_choice/
    sh script/grpo.sh medical_choice --set group_size=4 --reward-url http://127.0.0.1:8000/v1

Data: `data/rl/<task>.jsonl` (+ `.val.jsonl`), lines {id, source, prompt: [messages ending with user], answer}
(data_process/stage.py `stage_rl`; `read_rl_jsonl` also reads MedicalGPT's {question, answer} layout as it is).

Each optimizer step, per micro-batch: `batch_size` prompts, `group_size` (G) completions each, sampled with the
server's batched KV-cache engine (engine.py: one forward per token for all B*G sequences, each with its own
seed); rewards (rewards.py, weighted components) -> advantages within each group -> the clipped surrogate loss
on the completion tokens. Rollouts are a pure function of the weights and (seed, step, micro-step, rank), so
train_loop's resume after kill -9 reproduces the same losses.

The objective (grpo_loss, group_advantages), every option the field uses:
    advantage   "group": (r - mean_G) / (std_G + 1e-4)  (GRPO);  "mean": r - mean_G  (Dr. GRPO, arXiv:2503.20783)
    ratio       pi/pi_old per token, clipped to [1 - eps_low, 1 + eps_high] (PPO; DAPO's clip-higher, 2503.14476);
                pi_old is the policy that sampled, which differs from pi when updates_per_rollout > 1
    KL          beta * k3 = exp(ref - logp) - (ref - logp) - 1 per token (Schulman's estimator, as GRPO)
    loss_norm   "token": sum over all completion tokens / their count (DAPO);  "sequence": mean per completion,
                then over completions (GRPO);  "fixed": sum / (completions * max_new_tokens) (Dr. GRPO)
    truncated   completions cut at max_new_tokens are masked out of the loss (DAPO's overlong filtering)
A completion whose reward failed (raised, NaN, judge unreachable) gets advantage 0 and is left out of its group's
mean and std. Logged per step: reward mean/max (total and per component), share of zero-variance groups, KL,
clip fraction, completion length, truncated share, reward failures, and rollout / reference / reward seconds
(train_loop's step_s - data_s is the policy forward + backward). Every eval_interval steps: greedy completions
on the held-out prompts, reward per component.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from finetune import (IGNORE, add_train_args, check_init_from, cli_overrides, load_config, make_train_config,
                      pad_length, run_cli)
from model import TokenNLL
from rewards import RewardSpec, make_scorers, score_batch
from settings import ConfigError, limits

log = logging.getLogger("grpo")


# ---------------------------------------------------------------------------------------------- objective

def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, valid [P, G] (P prompts, G completions each) -> (advantages [P, G], zero_variance [P] bool).
    Mean and std (the sample std, n - 1, as torch.std and TRL) are over the valid completions of a group;
    invalid completions get 0. "group" divides by std + eps, "mean" does not (Dr. GRPO)."""
    if scale not in ("group", "mean"):
        raise ValueError(f"advantage scale {scale!r} (group, mean)")
    valid = valid.bool()
    r = torch.where(valid, rewards.double(), torch.zeros((), dtype=torch.float64))
    n = valid.sum(-1, keepdim=True)
    mean = r.sum(-1, keepdim=True) / n.clamp_min(1)
    centred = torch.where(valid, r - mean, torch.zeros((), dtype=torch.float64))
    var = (centred ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    std = var.sqrt()
    zero_variance = (std[:, 0] == 0) | (n[:, 0] < 2)
    adv = centred / (std + eps) if scale == "group" else centred
    adv = torch.where(valid & ~zero_variance[:, None], adv, torch.zeros((), dtype=torch.float64))
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32), zero_variance


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, eps_low: float = 0.2, eps_high: float = 0.28,
              beta: float = 0.0, loss_norm: str = "token", max_new_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (module docstring) over per-token log-probs [N, T] of the sampled tokens under the
    policy (with grad), the sampling policy (old) and the reference; advantages [N]; mask [N, T] (1 on the
    completion tokens that count). -> (loss, {"kl", "clip_fraction"} detached)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None].to(logps.dtype)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    n_tokens = mask.sum()
    if loss_norm == "token":
        loss = (per_token * mask).sum() / n_tokens.clamp_min(1)
    elif loss_norm == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        loss = per_seq.mean()
    elif loss_norm == "fixed":
        if max_new_tokens < 1:
            raise ValueError("loss_norm 'fixed' needs max_new_tokens")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    else:
        raise ValueError(f"loss_norm {loss_norm!r} (token, sequence, fixed)")
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (A < 0)) | ((ratio > 1.0 + eps_high) & (A > 0))
        denom = n_tokens.clamp_min(1)
        metrics = {"clip_fraction": (is_clipped.to(mask.dtype) * mask).sum() / denom,
                   "kl": (kl * mask).sum() / denom if kl is not None else torch.zeros(())}
    return loss, metrics


def token_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) per position [N, T] in fp32, 0 where the target is IGNORE; the MoE aux loss)."""
    select = targets != IGNORE
    out = model(input_ids, select=select)   # logits at the completion positions only: [n_selected, V]
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    logps[select] = -TokenNLL.apply(out.logits, targets[select])
    return logps, out.aux_loss


# ---------------------------------------------------------------------------------------------- rollouts

@dataclass
class Completion:
    tokens: list[int]         # sampled ids, with the stop id that ended it (so the policy learns to stop)
    text: str                 # decoded reply, without the stop id
    truncated: bool           # cut at max_new_tokens or the context end (no stop id)
    error: str | None = None  # the engine failed this one


def sample_completions(engine, tokenizer, prompts: list[list[int]], samplings: list) -> list[Completion]:
    """One completion per (prompt ids, Sampling), all decoded together by the engine (engine.run_jobs)."""
    from engine import Job, run_jobs
    events: list[dict] = [{} for _ in prompts]
    jobs = [Job(p, s, on_event=lambda kind, value, e=e: e.__setitem__(kind, value))
            for p, s, e in zip(prompts, samplings, events)]
    run_jobs(engine, jobs)
    out = []
    for job, e in zip(jobs, events):
        if "error" in e:
            out.append(Completion([], "", False, str(e["error"])))
            continue
        stopped = job.stop_token is not None
        out.append(Completion(job.tokens + ([job.stop_token] if stopped else []), tokenizer.decode(job.tokens),
                              truncated=not stopped))
    return out


def rollout_seed(*parts) -> int:
    """A 63-bit seed from (run seed, rollout, micro-step, rank, prompt, completion): order-independent."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def collate_completions(prompts: list[list[int]], completions: list[Completion], pad_id: int,
                        pad_multiple: int = 8) -> dict[str, torch.Tensor]:
    """[N, T] input_ids (prompt + completion, shifted) and targets (the completion tokens; IGNORE on the prompt
    and padding)."""
    seqs = [p + c.tokens for p, c in zip(prompts, completions)]
    T = pad_length(max(len(s) for s in seqs) - 1, pad_multiple)
    input_ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, :len(s) - 1] = s[:-1]
        targets[i, len(p) - 1:len(s) - 1] = s[len(p):]
    return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets)}


# ---------------------------------------------------------------------------------------------- config

@dataclass
class GRPOConfig:
    """One GRPO task, from config/grpo/<task>.toml; [train] holds train_loop.TrainConfig fields, [[reward]] the
    reward components (rewards.RewardSpec). Defaults and why: config/grpo/medical_choice.toml."""
    name: str
    data: list[str] | str = field(default_factory=list)      # RL prompt JSONL files or globs
    val_data: list[str] | str = field(default_factory=list)
    init_from: str = ""                                       # the policy's start (and the KL reference)
    out_dir: str = ""                                         # default out/grpo/<name>
    group_size: int = field(default=8, metadata=limits(ge=2))              # G completions per prompt
    max_new_tokens: int = field(default=256, metadata=limits(ge=1))
    temperature: float = field(default=1.0, metadata=limits(gt=0))
    top_p: float = field(default=1.0, metadata=limits(gt=0, le=1))
    top_k: int = field(default=0, metadata=limits(ge=0))
    repetition_penalty: float = field(default=1.0, metadata=limits(gt=0))
    advantage: str = field(default="group", metadata=limits(choices=("group", "mean")))
    loss_norm: str = field(default="token", metadata=limits(choices=("token", "sequence", "fixed")))
    eps_low: float = field(default=0.2, metadata=limits(ge=0, lt=1))
    eps_high: float = field(default=0.28, metadata=limits(ge=0))
    beta: float = field(default=0.0, metadata=limits(ge=0))
    mask_truncated: bool = True
    updates_per_rollout: int = field(default=1, metadata=limits(ge=1))      # optimizer steps per rollout batch
    shuffle_rewards: bool = False        # control experiment: rewards permuted across the batch (must not learn)
    epochs: float = field(default=1.0, metadata=limits(gt=0))
    warmup_fraction: float = field(default=0.0, metadata=limits(ge=0, le=1))
    decay_fraction: float = field(default=0.0, metadata=limits(ge=0, le=1))
    max_val_prompts: int = field(default=64, metadata=limits(ge=0))
    pad_multiple: int = field(default=8, metadata=limits(ge=1))
    reward: list[RewardSpec] = field(default_factory=list)
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = self.out_dir or f"out/grpo/{self.name}"
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        self.val_data = [self.val_data] if isinstance(self.val_data, str) else list(self.val_data)
        if not self.data:
            raise ValueError(f"GRPO task {self.name!r}: no data given")
        if not self.reward:
            raise ValueError(f"GRPO task {self.name!r}: no [[reward]] given")


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class PromptSet:
    items: list[dict]
    prompt_ids: list[list[int]]
    rejects: dict
    digest: str

    def __len__(self) -> int:
        return len(self.items)


def load_prompts(tokenizer, patterns, max_prompt_tokens: int) -> PromptSet:
    """RL prompt records (stage.read_rl_jsonl) rendered with the chat template's generation header; prompts
    longer than max_prompt_tokens are dropped and counted."""
    import glob
    from data_process.stage import read_rl_jsonl
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = sorted({Path(p) for pat in patterns for p in glob.glob(str(pat))})
    if not paths:
        raise FileNotFoundError(f"no RL prompt data matches {patterns} (run `python data_process.py` to stage it)")
    items, rejects = [], {}
    for path in paths:
        got, bad = read_rl_jsonl(path)
        items += got
        for k, v in bad.items():
            rejects[k] = rejects.get(k, 0) + v
    kept, ids = [], []
    h = hashlib.sha256()
    for item in items:
        p = tokenizer.render_chat(item["prompt"], add_generation_prompt=True).ids
        if len(p) > max_prompt_tokens:
            rejects["too_long"] = rejects.get("too_long", 0) + 1
            continue
        kept.append(item)
        ids.append(p)
        h.update(json.dumps([item["id"], item["answer"], p]).encode())
    if not kept:
        raise ValueError(f"no usable RL prompt in {[str(p) for p in paths]} (rejects: {rejects})")
    log.info("%s: %d prompts, rejected %s", [str(p) for p in paths], len(kept), rejects or "none")
    return PromptSet(kept, ids, rejects, h.hexdigest())


def _dtype_ctx(dtype: str, device: str):
    from train_loop import autocast_context
    return autocast_context(dtype, device)


class GRPOBatches:
    """`batches` for train_loop.train: each next_batch samples G completions for its prompts with the current
    policy, scores them and returns the tensors grpo_loss needs. A pure function of (weights, seed, step,
    micro_step, rank). With updates_per_rollout = k > 1 a rollout batch serves k optimizer steps (old log-probs
    kept for the ratio) and is part of state_dict, so a resume between those steps continues it exactly."""

    def __init__(self, cfg: GRPOConfig, data: PromptSet, model, tokenizer, *, batch_size: int, seed: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, dtype: str = "fp32", ref_model=None):
        from inference import Sampling
        self.cfg, self.data, self.model, self.tokenizer = cfg, data, model, tokenizer
        self.batch_size, self.seed, self.grad_accum = min(batch_size, len(data)), seed, grad_accum
        self.rank, self.world_size, self.dtype, self.ref_model = rank, world_size, dtype, ref_model
        self.batches_per_epoch = max(1, len(data) // self.batch_size)
        self.sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty)
        self.scorers = make_scorers(cfg.reward)
        self.engine = None
        self.buffer: dict = {}          # {"rollout": r, "micro": {m: batch}} for updates_per_rollout > 1
        self._plans: dict[int, np.ndarray] = {}

    def get_engine(self):
        if self.engine is None:   # made on first use: the model is on its training device by then
            from engine import Engine
            slots = self.batch_size * self.cfg.group_size
            self.engine = Engine(self.model, self.tokenizer, max_active=slots)
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)
            if half is not None:   # rollouts run under autocast: keys/values arrive in that dtype
                self.engine.cache = self.model.new_slot_cache(slots, dtype=half)
        return self.engine

    def steps_per_epoch(self) -> int:
        return max(1, self.batches_per_epoch // (self.grad_accum * self.world_size)) * self.cfg.updates_per_rollout

    def prompts_for(self, rollout: int, micro_step: int) -> np.ndarray:
        g = (rollout * self.grad_accum + micro_step) * self.world_size + self.rank
        epoch, pos = divmod(g, self.batches_per_epoch)
        if epoch not in self._plans:
            self._plans = {epoch: np.random.default_rng([self.seed, epoch, 11]).permutation(len(self.data))}
        return self._plans[epoch][pos * self.batch_size:(pos + 1) * self.batch_size]

    def next_batch(self, step: int, micro_step: int) -> dict:
        k = self.cfg.updates_per_rollout
        rollout = step // k
        if k > 1 and self.buffer.get("rollout") == rollout and micro_step in self.buffer["micro"]:
            batch = self.buffer["micro"][micro_step]   # reused: this step sampled and scored nothing
            timing = {key: 0.0 for key in ("rollout_s", "reward_s", "old_logps_s", "reference_s")}
            return {**batch, "stats": {**batch["stats"], **timing}}
        batch = self.make_batch(rollout, micro_step)
        if k > 1:
            if self.buffer.get("rollout") != rollout:
                self.buffer = {"rollout": rollout, "micro": {}}
            self.buffer["micro"][micro_step] = batch
        return batch

    @torch.no_grad()
    def make_batch(self, rollout: int, micro_step: int) -> dict:
        cfg, tok = self.cfg, self.tokenizer
        G = cfg.group_size
        idx = self.prompts_for(rollout, micro_step)
        prompts = [self.data.prompt_ids[i] for i in idx for _ in range(G)]
        items = [self.data.items[i] for i in idx for _ in range(G)]
        samplings = [dataclasses.replace(self.sampling,
                                         seed=rollout_seed(self.seed, rollout, micro_step, self.rank, i, j))
                     for i in idx for j in range(G)]
        device = self.model.lm_head.weight.device.type
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        with _dtype_ctx(self.dtype, device):
            completions = sample_completions(self.get_engine(), tok, prompts, samplings)
        rollout_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        ok = [c.error is None for c in completions]
        if not any(ok):   # the engine failed every sequence: a bug or a broken model, not a reward problem
            raise RuntimeError(f"every rollout failed at step {rollout}: {completions[0].error}")
        if not all(ok):
            log.warning("%d of %d rollouts failed (zero advantage): %s", ok.count(False), len(ok),
                        next(c.error for c in completions if c.error))
        scores = score_batch(cfg.reward, [c.text for c in completions], items,
                             [len(c.tokens) for c in completions], self.scorers)
        reward_s = time.perf_counter() - t0
        total = scores.total.copy()
        if cfg.shuffle_rewards:
            total = np.random.default_rng([self.seed, rollout, micro_step, self.rank, 5]).permutation(total)
        valid = torch.from_numpy(~scores.failed & np.array(ok)).view(-1, G)
        advantages, zero_var = group_advantages(torch.from_numpy(total).float().view(-1, G), valid, cfg.advantage)

        batch = collate_completions(prompts, completions, tok.pad_id, cfg.pad_multiple)
        truncated = torch.tensor([c.truncated for c in completions])
        keep = valid.flatten() & ~(truncated if cfg.mask_truncated else torch.zeros_like(truncated))
        batch["mask"] = ((batch["targets"] != IGNORE) & keep[:, None]).float()
        batch["advantages"] = advantages.flatten()

        t0 = time.perf_counter()
        dev = self.model.lm_head.weight.device
        on_dev = {k: v.to(dev) for k, v in batch.items()}
        if cfg.updates_per_rollout > 1:
            with _dtype_ctx(self.dtype, device):
                batch["old_logps"] = token_logps(self.model, on_dev["input_ids"], on_dev["targets"])[0].float().cpu()
        old_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.ref_model is not None:
            self.ref_model.to(dev)   # a no-op after the first call
            with _dtype_ctx(self.dtype, device):
                ref = token_logps(self.ref_model, on_dev["input_ids"], on_dev["targets"])[0]
                batch["ref_logps"] = ref.float().cpu()
        reference_s = time.perf_counter() - t0
        self.model.train(was_training)

        lengths = np.array([len(c.tokens) for c in completions], dtype=np.float64)
        stats = {"reward/mean": float(scores.total.mean()), "reward/max": float(scores.total.max()),
                 "zero_variance_groups": float(zero_var.float().mean()),
                 "completion_len": float(lengths.mean()), "completion_len_max": float(lengths.max()),
                 "truncated": float(truncated.float().mean()),
                 "reward_failures": float(scores.failed.sum() + (~np.array(ok)).sum()),
                 "rollout_s": rollout_s, "reward_s": reward_s, "old_logps_s": old_s, "reference_s": reference_s,
                 "rollout_tokens_per_s": float(lengths.sum() / max(rollout_s, 1e-9))}
        for name, values in scores.components.items():
            finite = values[np.isfinite(values)]
            stats[f"reward/{name}/mean"] = float(finite.mean()) if finite.size else 0.0
            stats[f"reward/{name}/max"] = float(finite.max()) if finite.size else 0.0
        batch["stats"] = stats
        return batch

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "prompts": len(self.data), "digest": self.data.digest}
        if self.cfg.updates_per_rollout > 1 and self.buffer:
            state["buffer"] = self.buffer
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        state = dict(state)
        buffer = state.pop("buffer", None)
        mine = {"seed": self.seed, "prompts": len(self.data), "digest": self.data.digest}
        if state != mine:
            raise ValueError(f"resuming on different RL prompts or seed: checkpoint {state}, now {mine}")
        self.buffer = buffer or {}


def make_loss_fn(cfg: GRPOConfig):
    """loss_fn(model, batch) for train_loop: per-token log-probs of the sampled completions -> grpo_loss."""

    def loss_fn(model, batch):
        logps, aux_loss = token_logps(model, batch["input_ids"], batch["targets"])
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        loss, metrics = grpo_loss(logps, old, batch["advantages"], batch["mask"], ref_logps=batch.get("ref_logps"),
                                  eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                                  loss_norm=cfg.loss_norm, max_new_tokens=cfg.max_new_tokens)
        return loss + aux_loss, {**metrics, **batch["stats"]}

    return loss_fn


def make_val_fn(cfg: GRPOConfig, data: PromptSet | None, batches: GRPOBatches, metrics_path: Path):
    """Greedy completions on the held-out prompts: mean reward (total and per component), completion length."""
    if data is None:
        return None
    from inference import Sampling
    greedy = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                      seed=0)

    def val_fn(model) -> dict:
        completions = sample_completions(batches.get_engine(), batches.tokenizer, data.prompt_ids,
                                         [greedy] * len(data))
        scores = score_batch(cfg.reward, [c.text for c in completions], data.items,
                             [len(c.tokens) for c in completions], batches.scorers)
        out = {f"{cfg.name}/reward": float(scores.total.mean()),
               f"{cfg.name}/completion_len": float(np.mean([len(c.tokens) for c in completions])),
               f"{cfg.name}/reward_failures": float(scores.failed.sum())}
        for name, values in scores.components.items():
            finite = values[np.isfinite(values)]
            out[f"{cfg.name}/{name}"] = float(finite.mean()) if finite.size else 0.0
        if metrics_path.is_file():   # the curves so far (this point is appended by train_loop after we return)
            plot_rewards(metrics_path, metrics_path.parent / "rewards.png")
        return out

    return val_fn


def plot_rewards(jsonl_path: Path, png_path: Path) -> None:
    """Train reward (mean, max), held-out reward, KL and clip fraction against step, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fileio import atomic_file
    from train_loop import read_jsonl
    records = read_jsonl(jsonl_path)
    train = [r for r in records if "reward/mean" in r]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_r, ax_k) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    steps = [r["step"] for r in train]
    for key in ("reward/mean", "reward/max"):
        ax_r.plot(steps, [r[key] for r in train], lw=0.8, label=f"train {key}")
    for key in sorted({k for r in val for k in r if k.endswith("/reward")}):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax_r.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {key}")
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=7)
    ax_r.grid(alpha=0.3)
    for key in ("kl", "clip_fraction", "zero_variance_groups"):
        ax_k.plot(steps, [r.get(key, 0.0) for r in train], lw=0.8, label=key)
    ax_k.set_xlabel("step")
    ax_k.legend(fontsize=7)
    ax_k.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png_path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- run

def run_grpo(cfg: GRPOConfig) -> dict:
    """Train one GRPO task through train_loop.train; returns the loop's summary."""
    import glob

    from checkpoint import data_provenance, load_checkpoint, provenance_chain
    from train_loop import dist_env, train
    if not cfg.init_from:
        raise ValueError(f"GRPO task {cfg.name!r}: init_from (the starting checkpoint) is required")
    check_init_from(cfg.init_from, "run `sh script/sft.sh` first; each GRPO config names the run it starts from")
    out_dir = Path(cfg.out_dir)
    model, tokenizer, init_meta = load_checkpoint(cfg.init_from)
    context = model.config.max_seq_len
    if cfg.max_new_tokens >= context:
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                          f"context {context}")
    max_prompt = context - cfg.max_new_tokens
    train_table = dict(cfg.train)
    train_table.setdefault("seq_len", context)
    data = load_prompts(tokenizer, cfg.data, max_prompt)
    val = None
    if cfg.val_data and any(glob.glob(str(p)) for p in cfg.val_data) and cfg.max_val_prompts:
        val = load_prompts(tokenizer, cfg.val_data, max_prompt)
        val = PromptSet(val.items[:cfg.max_val_prompts], val.prompt_ids[:cfg.max_val_prompts], val.rejects,
                        val.digest)
    env = dist_env()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    batches = GRPOBatches(cfg, data, model, tokenizer, batch_size=int(train_table.get("batch_size", 8)),
                          seed=int(train_table.get("seed", 1337)), grad_accum=int(train_table.get("grad_accum", 1)),
                          rank=env.rank, world_size=env.world_size, dtype=train_table.get("dtype", "bf16"),
                          ref_model=ref_model)
    total_steps = int(train_table.get("total_steps") or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))
    extra = {"name": cfg.name, "prompts": len(data), "rejects": data.rejects, "group_size": cfg.group_size,
             "init_from": str(cfg.init_from), "rewards": [r.__dict__ for r in cfg.reward]}
    train_cfg = make_train_config(train_table, str(out_dir), total_steps, cfg.warmup_fraction, cfg.decay_fraction,
                                  extra)
    print(f"grpo {cfg.name}: {len(data):,} prompts ({data.rejects or 'no rejects'}), G={cfg.group_size}, "
          f"{batches.batch_size} prompts per micro-batch, {total_steps} steps, rewards "
          f"{', '.join(f'{r.kind}*{r.weight:g}' for r in cfg.reward)}, from {cfg.init_from}")
    meta = {"kind": "grpo", "stage": cfg.name, "chat": True, "init_from": str(cfg.init_from)}
    # what trained it, after the chain its starting checkpoint carries (eval.py reads it back: contamination)
    patterns = [cfg.data] if isinstance(cfg.data, str) else cfg.data
    first_file = sorted(p for pat in patterns for p in glob.glob(str(pat)))[0]   # load_prompts found at least one
    meta["provenance"] = provenance_chain(init_meta, data_provenance(f"grpo {cfg.name}", first_file))
    metrics_path = out_dir / "metrics.jsonl"
    val_fn = make_val_fn(cfg, val, batches, metrics_path)
    summary = train(train_cfg, model, tokenizer, batches, loss_fn=make_loss_fn(cfg), val_fn=val_fn, meta=meta)
    if env.is_main and metrics_path.is_file():
        plot_rewards(metrics_path, out_dir / "rewards.png")
    summary.update(prompts=len(data), rejects=data.rejects)
    return summary


def load_grpo_config(name_or_path: str, config_dir="config/grpo", overrides: list[str] | None = None) -> GRPOConfig:
    return load_config(GRPOConfig, name_or_path, config_dir, overrides, "name", "GRPO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GRPO with verifiable rewards on data/rl/<task>.jsonl, rollouts by the batched engine.",
        epilog="examples:\n  python grpo.py medical_choice\n"
               "  python grpo.py medical_qa --set group_size=4 --set beta=0.04 --set train.lr=1e-6\n"
               "  python grpo.py medical_qa --reward-url http://127.0.0.1:8000/v1   # a judge for free-form answers",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task name (config/grpo/<task>.toml) or a .toml path")
    p.add_argument("--config-dir", default="config/grpo")
    p.add_argument("--data", action="append", help="RL prompt JSONL file or glob (repeatable; default: the config's)")
    p.add_argument("--init-from", help="starting checkpoint (default: the config's)")
    p.add_argument("--out-dir", help="output dir (default out/grpo/<task>)")
    p.add_argument("--group-size", type=int, help="completions per prompt (G)")
    p.add_argument("--reward-url", help="OpenAI-compatible judge endpoint for the config's judge reward "
                                        "(adds a judge reward of weight 1 if the config has none)")
    add_train_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = cli_overrides(args, ("data", "init_from", "out_dir", "group_size"))

    def job():
        cfg = load_grpo_config(args.task, args.config_dir, overrides)
        if args.reward_url:
            judges = [r for r in cfg.reward if r.kind == "judge"] or [RewardSpec("judge")]
            if judges[0] not in cfg.reward:
                cfg.reward.append(judges[0])
            for r in judges:
                r.url = args.reward_url
        return run_grpo(cfg)
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------- a synthetic task

SYNTHETIC_CHARS = "山水火木金土日月风云雨雪花草树林石田禾米心手口目耳足牛羊马鸟鱼虫竹"


def synthetic_choice_items(n: int, seed: int = 0, n_options: int = 4, layouts: int = 0) -> list[dict]:
    """A verifiable task for tests and benchmarks: "which option contains the character X? answer with its
    letter", as RL prompt records (answer = the letter). Options are distinct two-character strings; exactly
    one contains X. layouts > 0 draws the option lists from that many fixed ones (X and the right letter still
    vary): a task that a tiny model can learn in a few dozen steps; 0 = a new option list for every item."""
    rng = np.random.default_rng(seed)
    letters = "ABCDEFGHIJ"[:n_options]
    fixed = [[str(c) for c in rng.choice(list(SYNTHETIC_CHARS), size=2 * n_options, replace=False)]
             for _ in range(layouts)]
    items = []
    for k in range(n):
        if fixed:
            chars = fixed[int(rng.integers(layouts))]
            right = int(rng.integers(n_options))
            options = [chars[2 * i] + chars[2 * i + 1] for i in range(n_options)]
            x = options[right][int(rng.integers(2))]
        else:
            x, *others = rng.choice(list(SYNTHETIC_CHARS), size=1 + 2 * n_options, replace=False)
            right = int(rng.integers(n_options))
            options = [others[2 * i] + others[2 * i + 1] for i in range(n_options)]
            options[right] = options[right][0] + x if rng.integers(2) else x + options[right][1]
        question = ("\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
                    + f"\n哪个选项含有“{x}”？只回答选项字母。")
        items.append({"id": f"synthetic:{seed}:{k}", "source": "synthetic",
                      "prompt": [{"role": "user", "content": question}], "answer": letters[right]})
    return items
