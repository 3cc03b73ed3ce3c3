"""Checkpoints: the one format every job writes and every later step reads.

A checkpoint is a directory (`<out_dir>/step-000123/`, `<out_dir>/final/`): model.safetensors + config.json (the
model's save_pretrained), tokenizer.model + tokenizer_meta.json (a copy: every checkpoint is self-contained),
meta.json (tokenizer hash, step, tokens, kind, phase/stage, chat, the sizes and sha256 of every file), and for
resume train_state.pt (optimizer, grad scaler, loader, RNG states; plain tensors and Python values only, so it
loads with `torch.load(weights_only=True)`).

    save_checkpoint(dir, model, tokenizer, meta, train_state)   # atomic: the old checkpoint or the new one
    meta = verify_checkpoint(dir)                                # every file present, sizes and sha256 match
    model, tokenizer, meta = load_checkpoint(dir)                # the one loader everybody uses
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from fileio import file_sha256, fsync_dir

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not belong to this run."""


def save_checkpoint(ckpt_dir, model, tokenizer, meta: dict, train_state: dict | None = None) -> Path:
    """Write a self-contained checkpoint atomically: everything goes to a temp dir beside it, is fsynced, and
    the dir is renamed into place, so a kill at any moment leaves either the old checkpoint or the new one."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".tmp-{ckpt_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    files = {}
    for p in sorted(tmp.iterdir()):
        if p.is_file():
            files[p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    meta = {**meta, "format": CHECKPOINT_FORMAT, "tokenizer_sha256": tokenizer.sha256, "files": files}
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    old = ckpt_dir.parent / f".old-{ckpt_dir.name}"
    if ckpt_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(ckpt_dir, old)
    os.rename(tmp, ckpt_dir)
    fsync_dir(ckpt_dir.parent)
    if old.exists():
        shutil.rmtree(old)
    return ckpt_dir


def verify_checkpoint(ckpt_dir) -> dict:
    """Check that a checkpoint is complete and intact (every file present with the size and sha256 recorded
    in meta.json, and the tokenizer copy is the one the model was trained with); return its meta."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupted: {e}") from None
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        if name not in meta.get("files", {}):
            raise CheckpointError(f"{ckpt_dir}: meta.json lists no {name}; not a checkpoint written by train_loop")
    for name, info in meta["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{ckpt_dir}: {name} is {size} bytes, expected {info['bytes']} "
                                  f"(truncated or overwritten); refusing to load it")
        if file_sha256(path) != info["sha256"]:
            raise CheckpointError(f"{ckpt_dir}: {name} does not match its recorded sha256 (corrupted); "
                                  f"refusing to load it")
    tok_sha = file_sha256(ckpt_dir / "tokenizer.model")
    if tok_sha != meta.get("tokenizer_sha256"):
        raise CheckpointError(f"{ckpt_dir}: the tokenizer copy (sha256 {tok_sha[:12]}) is not the tokenizer the "
                              f"model was trained with ({str(meta.get('tokenizer_sha256'))[:12]})")
    return meta


def load_checkpoint(ckpt_dir, device: str = "cpu"):
    """The one checkpoint loader: -> (model, tokenizer, meta). Verifies the checkpoint first (see
    verify_checkpoint) and refuses a corrupted or mismatched one with a CheckpointError."""
    from model import Transformer
    from tokenizer import Tokenizer
    meta = verify_checkpoint(ckpt_dir)
    tokenizer = Tokenizer.load(ckpt_dir)
    if tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise CheckpointError(f"{ckpt_dir}: tokenizer hash {tokenizer.sha256[:12]} != meta.json's "
                              f"{meta['tokenizer_sha256'][:12]}")
    try:
        model = Transformer.from_pretrained(ckpt_dir, device=device)
    except Exception as e:   # safetensors/config errors: say which checkpoint
        raise CheckpointError(f"{ckpt_dir}: cannot load the model: {e}") from e
    return model, tokenizer, meta


def load_train_state(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no train_state.pt (a weights-only checkpoint cannot be resumed)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from e


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, dir) of the checkpoints in out_dir, oldest first (final/ after step-* of the same step)."""
    found = []
    for d in Path(out_dir).glob("step-*"):
        if d.is_dir() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), 0, d))
    final = Path(out_dir) / "final"
    if (final / "meta.json").is_file():
        with contextlib.suppress(Exception):
            found.append((int(json.loads((final / "meta.json").read_text())["step"]), 1, final))
    return [(s, d) for s, _, d in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def clean_stale_tmp(out_dir: Path) -> None:
    """Remove what a killed save left behind; put back a checkpoint caught between its two renames."""
    for old in out_dir.glob(".old-*"):
        target = out_dir / old.name[len(".old-"):]
        if target.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, target)
    for tmp in out_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    steps = [d for s, d in list_checkpoints(out_dir) if d.name.startswith("step-")]
    for d in steps[:-keep_last] if keep_last > 0 else steps:
        shutil.rmtree(d, ignore_errors=True)


def param_digest(model) -> str:
    """sha256 of all parameters, to check that DDP replicas are identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
