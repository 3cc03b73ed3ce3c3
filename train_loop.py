"""The one training loop, shared by pretrain.py, sft.py and dpo.py.

It owns everything a run needs besides its data and its loss: the Warmup-Stable-Decay learning rate
(MiniCPM, arXiv 2404.06395), AdamW, mixed precision, gradient accumulation and clipping, DDP under torchrun,
atomic checkpoints with exact resume, a NaN stop, and what the user watches (tqdm bar, metrics.jsonl,
metrics.png). Checkpoints are written and verified by checkpoint.py (its `load_checkpoint` is the one loader
everybody uses).

    cfg = TrainConfig(out_dir="out/pretrain/stable", total_steps=1000, lr=1e-3, warmup_steps=10, ...)
    train(cfg, model, tokenizer, batches, val_fn=val_fn, meta={"kind": "base", "phase": "stable"})

`batches` is any object with `next_batch(step, micro_step) -> dict[str, Tensor]` (deterministic in
(seed, step, micro_step, rank), which is what makes resume exact), `state_dict()` and `load_state_dict()`.
Steps are global: a run that continues another (`init_from`) starts at that checkpoint's step and ends at
`total_steps`, so the schedule is one curve across runs (pretrain phases use this).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (CheckpointError, clean_stale_tmp, latest_checkpoint, load_train_state, move_aside_run,
                        param_digest, prune_checkpoints, resume_point, save_checkpoint, verify_checkpoint)
from fileio import DirLock, DiskFullError, LockedError, atomic_file, atomic_write_text, describe_holder
from settings import limits

class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without applying that step."""


@dataclass
class TrainConfig:
    out_dir: str
    total_steps: int = field(metadata=limits(ge=1))   # the global step at which this run ends
    batch_size: int = field(default=8, metadata=limits(ge=1))      # sequences per micro-batch per rank
    grad_accum: int = field(default=1, metadata=limits(ge=1))      # micro-batches per optimizer step
    seq_len: int = field(default=512, metadata=limits(ge=2))
    # Warmup-Stable-Decay schedule over global steps (see wsd_lr)
    lr: float = field(default=1e-3, metadata=limits(gt=0))         # peak learning rate
    min_lr: float = field(default=1e-4, metadata=limits(ge=0))
    warmup_steps: int = field(default=0, metadata=limits(ge=0))
    stable_steps: int = field(default=0, metadata=limits(ge=0))
    decay_steps: int = field(default=0, metadata=limits(ge=0))
    decay: str = field(default="exp", metadata=limits(choices=("exp", "linear", "cosine")))
    weight_decay: float = field(default=0.1, metadata=limits(ge=0))   # on >= 2-D parameters only
    adam_beta1: float = field(default=0.9, metadata=limits(ge=0, lt=1))
    adam_beta2: float = field(default=0.95, metadata=limits(ge=0, lt=1))
    grad_clip: float = field(default=1.0, metadata=limits(ge=0))   # max global grad norm; 0 = no clipping
    # "bf16" (autocast) | "fp16" (autocast + GradScaler) | "fp32"
    dtype: str = field(default="bf16", metadata=limits(choices=("bf16", "fp16", "fp32")))
    compile: bool = False            # torch.compile the model
    device: str = "auto"             # "auto" | "cpu" | "cuda"
    # steps between val_fn calls / checkpoints (also at the end); 0 = only at the end
    eval_interval: int = field(default=100, metadata=limits(ge=0))
    save_interval: int = field(default=500, metadata=limits(ge=0))
    keep_last: int = field(default=3, metadata=limits(ge=0))      # step-* checkpoints kept (final/ is kept apart)
    seed: int = 1337
    resume: bool = True              # continue from the latest checkpoint in out_dir if there is one
    init_from: str = ""              # continue another run: weights, optimizer, step, tokens (not data position)
    peak_flops: float = field(default=0.0, metadata=limits(ge=0))   # per device, for MFU; 0 = table / measured
    progress: bool = True            # tqdm bar (rank 0)
    wandb_project: str = ""          # log to wandb too, if it is installed
    tensorboard: bool = False        # log to TensorBoard too (<out_dir>/tb), if it is installed
    extra: dict = field(default_factory=dict)   # caller's own settings, recorded in meta.json


# ----------------------------------------------------------------------------- schedule

def wsd_lr(step: int, *, peak_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int,
           min_lr: float, decay: str = "exp") -> float:
    """Warmup-Stable-Decay (MiniCPM, arXiv 2404.06395 sec. 4): linear warmup to peak_lr, constant, then a decay
    over decay_steps that ends exactly at min_lr, and min_lr after that. "exp" is MiniCPM's exponential decay
    (peak * (min/peak)^(t/decay_steps), i.e. a half-life of decay_steps * ln2 / ln(peak/min))."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    t = step - warmup_steps - stable_steps
    if t < 0:
        return peak_lr
    if t >= decay_steps:
        return min_lr
    frac = (t + 1) / decay_steps
    if decay == "linear":
        return peak_lr + (min_lr - peak_lr) * frac
    if decay == "cosine":
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if decay == "exp":
        if min_lr <= 0:
            raise ValueError("exponential decay needs min_lr > 0")
        return peak_lr * (min_lr / peak_lr) ** frac
    raise ValueError(f"unknown decay {decay!r} (exp, linear, cosine)")


def lr_at(cfg: TrainConfig, step: int) -> float:
    return wsd_lr(step, peak_lr=cfg.lr, warmup_steps=cfg.warmup_steps, stable_steps=cfg.stable_steps,
                  decay_steps=cfg.decay_steps, min_lr=cfg.min_lr, decay=cfg.decay)


# ----------------------------------------------------------------------------- devices, DDP

@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def dist_env() -> DistInfo:
    """Rank, local rank and world size as torchrun sets them (1 process when it did not); the one place that
    reads RANK/LOCAL_RANK/WORLD_SIZE. Joins nothing: see init_distributed."""
    return DistInfo(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=int(os.environ.get("WORLD_SIZE", "1")))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU.
    Multi-node is torchrun's business (--nnodes, --node_rank, --rdzv_endpoint); nothing changes here."""
    device = resolve_device(device)
    env = dist_env()
    world_size, rank, local_rank = env.world_size, env.rank, env.local_rank
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device == "cpu":   # share the cores between the local ranks instead of oversubscribing them
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown_distributed(ok: bool = True) -> None:
    """Leave the process group, if one was joined. After a run that ended well (`ok`), every rank first waits for
    the others, so that no rank tears gloo down while another is still using it (which aborts that one:
    "terminate called without an active exception"). After an error there is no barrier: the other ranks may be
    waiting in another collective, and torchrun stops them when this rank exits."""
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _all_reduce_mean(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world_size
    return x


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- one run per out dir

_held_locks: dict[str, DirLock] = {}


@contextlib.contextmanager
def out_dir_lock(out_dir, what: str = ""):
    """Hold `<out_dir>/.lock` (fileio.DirLock) for as long as the block runs: a second run on the same out dir
    is refused with a LockedError naming the holder; a lock left by a run that died is taken over (said on
    stderr). Re-entrant within a process, so sft.py/dpo.py can lock before they write their caches and
    train() inside them finds the lock already held. Take it on rank 0 only (train() does)."""
    key = str(Path(out_dir).resolve())
    if key in _held_locks:
        yield _held_locks[key]
        return
    lock = DirLock(out_dir, what).acquire()
    if lock.took_over:
        print(f"note: {out_dir} was locked by a run that is no longer alive ({describe_holder(lock.took_over)}); "
              f"taking it over", file=sys.stderr)
    _held_locks[key] = lock
    try:
        yield lock
    finally:
        _held_locks.pop(key, None)
        lock.release()


def rank0_lock(out_dir, what: str = ""):
    """out_dir_lock on the main rank (as torchrun set RANK), nothing on the others."""
    return out_dir_lock(out_dir, what) if dist_env().is_main else contextlib.nullcontext()


# ----------------------------------------------------------------------------- optimizer, precision

def make_optimizer(cfg: TrainConfig, params, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (>= 2-D); norms and biases are not decayed."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters; on CUDA and (torch >= 2.4) on CPU too, where it is ~4x faster than
    # the default foreach implementation for the 26m preset
    fused = device.startswith(("cuda", "cpu")) and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                                       for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)


def autocast_context(dtype: str, device: str):
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if dtype == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    if dtype == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown dtype {dtype!r} (bf16, fp16, fp32)")


# Dense bf16 peak per GPU (vendor datasheets, without sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
_measured_peak: dict[str, float] = {}


def peak_flops(device: str, dtype: str) -> float:
    """Peak FLOP/s of one device for MFU. GPUs: the datasheet. CPUs have no datasheet figure we can trust, so
    we measure a large matmul in the training dtype once and call that the peak (MFU on CPU is therefore
    relative to what this machine's matmul achieves)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 100e12
    key = f"{device}:{dtype}"
    if key not in _measured_peak:
        n = 1024
        # fp16 matmuls have no fast path on most CPUs (emulated: minutes), so fp16 is measured as fp32
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(n, n, dtype=torch_dtype)
        b = torch.randn(n, n, dtype=torch_dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _measured_peak[key] = 2 * n**3 / best
    return _measured_peak[key]


def model_flops_per_token(model, seq_len: int) -> float:
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters())


def default_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """LM loss on batch["input_ids"] -> batch["targets"] (optional batch["loss_weights"]), plus the MoE aux loss."""
    out = model(batch["input_ids"], targets=batch["targets"], loss_weights=batch.get("loss_weights"))
    aux = out.aux_loss if out.aux_loss is not None else 0.0
    metrics = {"aux_loss": aux.detach()} if torch.is_tensor(aux) and aux.requires_grad else {}
    return out.loss + aux, metrics


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng(world_size: int) -> list:
    mine = _rng_state()
    if world_size == 1:
        return [mine]
    every = [None] * world_size
    dist.all_gather_object(every, mine)
    return every


# ----------------------------------------------------------------------------- metrics

def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            with contextlib.suppress(json.JSONDecodeError):   # a line cut by kill -9
                out.append(json.loads(line))
    return out


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop what the killed run logged after the checkpoint it resumes from, so that
    metrics.jsonl reads as one uninterrupted run."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", -1) < after_step]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def plot_metrics(jsonl_path: Path, png_path: Path) -> None:
    """Loss (train and per-corpus val) and LR against step, written atomically to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_jsonl(jsonl_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    for key in sorted({k for r in val for k in r if k.endswith("/loss")}):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax_loss.plot(*zip(*pts), marker="o", ms=3, label=key)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png_path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


class _ExternalLoggers:
    """wandb / TensorBoard when asked for and installed; a warning otherwise. Never required."""

    def __init__(self, cfg: TrainConfig):
        self.wandb = self.tb = None
        if cfg.wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.out_dir,
                                        config=dataclasses.asdict(cfg), resume="allow")
            except ImportError:
                print("warning: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(cfg.out_dir) / "tb"))
            except ImportError:
                print("warning: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- the loop

def _to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _float(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def train(cfg: TrainConfig, model, tokenizer, batches, *, loss_fn=None, val_fn=None, trainable_params=None,
          meta: dict | None = None) -> dict:
    """Train `model` from its current step to cfg.total_steps; returns a summary dict (final loss, tokens/s,
    MFU, last val metrics, final checkpoint dir). Resumes automatically from the newest checkpoint in
    cfg.out_dir that verifies (cfg.resume; newer ones that fail are set aside), or continues the run in
    cfg.init_from. The out dir is locked for the run (a second run on it gets a LockedError naming this one).
    Raises TrainingDiverged on a NaN/inf loss."""
    info = init_distributed(cfg.device)
    with contextlib.ExitStack() as stack:
        refused = ""
        if info.is_main:
            try:
                stack.enter_context(out_dir_lock(cfg.out_dir))
            except LockedError as e:
                refused = str(e)
        if info.world_size > 1:   # every rank stops if rank 0 could not lock
            box = [refused]
            dist.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused:
            raise LockedError(refused)
        return _train_locked(cfg, info, model, tokenizer, batches, loss_fn=loss_fn, val_fn=val_fn,
                             trainable_params=trainable_params, meta=meta)


def _train_locked(cfg: TrainConfig, info: DistInfo, model, tokenizer, batches, *, loss_fn, val_fn,
                  trainable_params, meta) -> dict:
    loss_fn = loss_fn or default_loss
    meta = dict(meta or {})
    meta.setdefault("kind", "base")
    meta.setdefault("chat", meta["kind"] != "base")
    device = info.device
    out_dir = Path(cfg.out_dir)
    resume_name = ""
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out_dir)
        if not cfg.resume:   # starting over: a later resume must never pick up a checkpoint of the abandoned run
            moved = move_aside_run(out_dir)
            if moved is not None:
                print(f"resume disabled: moved the old checkpoints and metrics of {out_dir} to {moved.name}/ "
                      f"(nothing deleted)")
        else:
            found = resume_point(out_dir)   # sets aside (renames) newer checkpoints that fail verification
            resume_name = found.name if found is not None else ""
    if info.world_size > 1:   # every rank resumes from the checkpoint rank 0 verified
        box = [resume_name]
        dist.broadcast_object_list(box, src=0)
        resume_name = box[0]
    metrics_path = out_dir / "metrics.jsonl"

    if device.startswith("cuda"):   # TF32 for whatever still runs in fp32 (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model.to(device)
    params = list(trainable_params) if trainable_params is not None else \
        [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=cfg.dtype == "fp16")
    torch.manual_seed(cfg.seed + info.rank)

    # where to start: our own latest checkpoint (resume), another run's (init_from), or step 0
    step, tokens_seen = 0, 0
    resume_dir = out_dir / resume_name if resume_name else None
    start_dir = resume_dir or (Path(cfg.init_from) if cfg.init_from else None)
    if start_dir is not None:
        ckpt_meta = verify_checkpoint(start_dir)
        if ckpt_meta["tokenizer_sha256"] != tokenizer.sha256:
            raise CheckpointError(f"{start_dir} was trained with tokenizer {ckpt_meta['tokenizer_sha256'][:12]}, "
                                  f"this run uses {tokenizer.sha256[:12]}; refusing to mix them")
        state = load_train_state(start_dir)
        from safetensors.torch import load_file
        try:
            weights = load_file(str(start_dir / "model.safetensors"), device="cpu")
            missing, unexpected = raw_model.load_state_dict(weights, strict=False)
        except Exception as e:
            raise CheckpointError(f"{start_dir}: model.safetensors does not fit this model: {e}") from e
        missing = [k for k in missing if not k.endswith("lm_head.weight")]   # tied embeddings are saved once
        if missing or unexpected:
            raise CheckpointError(f"{start_dir}: model.safetensors does not fit this model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{start_dir}: optimizer state does not fit this model: {e}") from e
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if resume_dir is not None:   # our own run: the data position, scaler and RNG continue too
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            batches.load_state_dict(state["loader"])
            rng = state["rng"]
            _set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])
            if info.is_main:
                print(f"resuming {out_dir} from {resume_dir.name} (step {step}, {tokens_seen:,} tokens)")
        elif info.is_main:
            print(f"continuing from {start_dir} (step {step}, {tokens_seen:,} tokens)")
    if info.is_main:   # metrics.jsonl reads as one run: drop what was logged past the starting point
        truncate_metrics(metrics_path, step)
    if step > cfg.total_steps:
        raise ValueError(f"the starting checkpoint is at step {step}, past this run's total_steps {cfg.total_steps}")

    fwd_model = raw_model
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        n_experts = getattr(getattr(raw_model, "config", None), "n_experts", 0)
        fwd_model = DDP(fwd_model, device_ids=[info.local_rank] if device.startswith("cuda") else None,
                        find_unused_parameters=n_experts > 0)

    flops_per_token = model_flops_per_token(raw_model, cfg.seq_len)
    device_peak = cfg.peak_flops or peak_flops(device, cfg.dtype)
    loggers = _ExternalLoggers(cfg) if info.is_main else None
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.total_steps, initial=step, desc=out_dir.name, dynamic_ncols=True, file=sys.stdout)

    def checkpoint(name: str) -> Path:
        rngs = _gather_rng(info.world_size)
        digests = [param_digest(raw_model)]
        if info.world_size > 1:   # DDP replicas must be identical; a mismatch is a bug, not something to save
            every = [None] * info.world_size
            dist.all_gather_object(every, digests[0])
            if len(set(every)) != 1:
                raise RuntimeError(f"DDP replicas diverged at step {step}: parameter digests {every}")
        path = out_dir / name
        if info.is_main:
            state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                     "loader": batches.state_dict(), "rng": rngs, "world_size": info.world_size}
            ckpt_meta = {**meta, "step": step, "tokens_seen": tokens_seen, "param_sha256": digests[0],
                         "world_size": info.world_size, "train_config": dataclasses.asdict(cfg)}
            try:
                save_checkpoint(path, raw_model, tokenizer, ckpt_meta, state)
            except DiskFullError as e:
                good = latest_checkpoint(out_dir)
                kept = f"the previous checkpoint {good} is intact" if good else "no earlier checkpoint exists"
                raise DiskFullError(e.errno, f"{e.strerror}; step {step} was not saved; {kept}") from None
            prune_checkpoints(out_dir, cfg.keep_last)
        _barrier(info.world_size)
        return path

    def validate() -> dict:
        if val_fn is None or not info.is_main:
            return {}
        raw_model.eval()
        with torch.no_grad(), autocast_context(cfg.dtype, device):
            result = {k: _float(v) for k, v in val_fn(raw_model).items()}
        raw_model.train()
        record = {"kind": "val", "step": step, "tokens": tokens_seen, **result}
        append_jsonl(metrics_path, record)
        loggers.log(record)
        plot_metrics(metrics_path, out_dir / "metrics.png")
        line = f"step {step}: loss {last['loss']:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in result.items())
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)
        return result

    raw_model.train()
    last = {"loss": float("nan"), "tokens_per_s": 0.0, "mfu": 0.0, "val": {}}
    timings = {"data_s": 0.0, "step_s": 0.0, "steps": 0}
    start_step = step
    while step < cfg.total_steps:
        t_step = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        extra: dict[str, float] = {}
        step_tokens = 0
        data_s = 0.0
        for micro_step in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = _to_device(batches.next_batch(step, micro_step), device)
            data_s += time.perf_counter() - t_data
            step_tokens += batch["input_ids"].numel()
            sync = micro_step == cfg.grad_accum - 1
            no_sync = fwd_model.no_sync() if info.world_size > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast_context(cfg.dtype, device):
                    loss, metrics = loss_fn(fwd_model, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in (metrics or {}).items():
                extra[k] = extra.get(k, 0.0) + _float(v) / cfg.grad_accum
        loss_val = _all_reduce_mean(loss_sum / cfg.grad_accum, info.world_size).item()
        if not math.isfinite(loss_val):
            if bar is not None:
                bar.close()
            good = latest_checkpoint(out_dir)
            raise TrainingDiverged(
                f"loss is {loss_val} at step {step} (lr {lr:.3g}); stopped before applying this step. "
                f"The last good checkpoint is {good or 'none (no checkpoint was written yet)'}. "
                f"Lower the learning rate, raise warmup, or use bf16 instead of fp16, then resume.")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        step += 1
        tokens_seen += step_tokens * info.world_size
        dt = time.perf_counter() - t_step
        if step > start_step + 1:   # the first step pays for warm-up (allocation, compile)
            timings["data_s"] += data_s
            timings["step_s"] += dt
            timings["steps"] += 1
        tokens_per_s = step_tokens * info.world_size / dt
        mfu = flops_per_token * step_tokens / dt / device_peak
        last.update(loss=loss_val, tokens_per_s=tokens_per_s, mfu=mfu)
        if info.is_main:
            record = {"step": step - 1, "loss": loss_val, "lr": lr, "grad_norm": _float(grad_norm),
                      "tokens": tokens_seen, "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 5),
                      "step_s": round(dt, 4), "data_s": round(data_s, 5), **extra}
            append_jsonl(metrics_path, record)
            loggers.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                mfu=f"{mfu:.1%}", refresh=False)
                bar.update(1)
        done = step == cfg.total_steps
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or done:
            last["val"] = validate()
        if cfg.save_interval and step % cfg.save_interval == 0 and not done:
            checkpoint(f"step-{step:06d}")
    if bar is not None:
        bar.close()
    if step == start_step and resume_dir is not None and resume_dir.name == "final":
        final = resume_dir
        if info.is_main:
            print(f"{out_dir} is already at step {step} of {cfg.total_steps}; nothing to train")
    else:
        final = checkpoint("final")
    if loggers is not None:
        loggers.close()
    n = max(timings["steps"], 1)
    return {"step": step, "tokens_seen": tokens_seen, "loss": last["loss"], "tokens_per_s": last["tokens_per_s"],
            "mfu": last["mfu"], "val": last["val"], "final_dir": str(final),
            "mean_step_s": timings["step_s"] / n, "data_fraction": timings["data_s"] / max(timings["step_s"], 1e-12),
            "param_sha256": param_digest(raw_model)}
