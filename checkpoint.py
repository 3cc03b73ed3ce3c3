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
import sys
import time
from pathlib import Path

import torch

from fileio import disk_full_as_error, file_sha256, fsync_dir

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not belong to this run."""


def save_checkpoint(ckpt_dir, model, tokenizer, meta: dict, train_state: dict | None = None) -> Path:
    """Write a self-contained checkpoint atomically: everything goes to a temp dir beside it, is fsynced, and
    the dir is renamed into place, so a kill at any moment leaves either the old checkpoint or the new one.
    A full disk is a fileio.DiskFullError naming the checkpoint (not torch's "unexpected pos"); the temp dir is
    removed and the checkpoint that was there before is left as it was."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".tmp-{ckpt_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with disk_full_as_error(ckpt_dir):
            tmp.mkdir()
            _write_checkpoint_files(tmp, model, tokenizer, meta, train_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


class _ErrorKeepingFile:
    """A write-only file wrapper that remembers the OSError a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _write_checkpoint_files(tmp: Path, model, tokenizer, meta: dict, train_state: dict | None) -> None:
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    if train_state is not None:
        # through our own file object, which keeps the OSError: on a full disk torch's zip writer reports only
        # "inline_container.cc: unexpected pos", hiding the ENOSPC
        with open(tmp / "train_state.pt", "wb") as f:
            writer = _ErrorKeepingFile(f)
            try:
                torch.save(train_state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
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


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S")


def _unused(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def set_aside(ckpt_dir, why: str = "bad") -> Path:
    """Rename a checkpoint out of the way (`step-000006` -> `step-000006.bad-<time>`): nothing lists it any
    more, nothing deletes it, and whoever looks can still inspect it."""
    ckpt_dir = Path(ckpt_dir)
    dest = _unused(ckpt_dir.with_name(f"{ckpt_dir.name}.{why}-{_stamp()}"))
    os.rename(ckpt_dir, dest)
    fsync_dir(ckpt_dir.parent)
    return dest


def resume_point(out_dir, set_aside_bad: bool = True) -> Path | None:
    """The newest checkpoint in out_dir that passes verify_checkpoint, or None. A newer one that fails is
    reported (and, with set_aside_bad, renamed `<name>.bad-<time>`) and the next older one is tried, so one
    corrupted save costs the steps since the previous checkpoint, not the run. A `final/` whose meta.json
    cannot be read counts as a failed one. Only the run holding the out dir's lock may set aside."""
    out_dir = Path(out_dir)
    ckpts = [d for _, d in list_checkpoints(out_dir)]
    final = out_dir / "final"
    if final.is_dir() and final not in ckpts:   # meta.json missing or unreadable: newest by construction
        ckpts.append(final)
    for d in reversed(ckpts):
        try:
            verify_checkpoint(d)
        except CheckpointError as e:
            if set_aside_bad:
                moved = set_aside(d)
                print(f"warning: {e}; moved it aside to {moved.name} and trying the previous checkpoint",
                      file=sys.stderr)
            continue
        return d
    return None


def move_aside_run(out_dir) -> Path | None:
    """Starting over (--no-resume): move every checkpoint and the metrics of the abandoned run into
    `<out_dir>/abandoned-<time>/` (never deleted), so a later resume cannot pick them up. -> that dir or None."""
    out_dir = Path(out_dir)
    old = [d for _, d in list_checkpoints(out_dir)]
    if (out_dir / "final").is_dir() and out_dir / "final" not in old:
        old.append(out_dir / "final")
    old += [p for p in (out_dir / "metrics.jsonl", out_dir / "metrics.png") if p.exists()]
    if not old:
        return None
    dest = _unused(out_dir / f"abandoned-{_stamp()}")
    dest.mkdir()
    for p in old:
        os.rename(p, dest / p.name)
    fsync_dir(out_dir)
    return dest


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


# ----------------------------------------------------------------------------- data provenance

def find_data_root(path) -> Path | None:
    """The data dir (`data/`) a training input lives in: the nearest of the path and its parents holding
    dedup/report.json or summary.json (data/pretrain -> data, data/sft/medical.csv -> data)."""
    path = Path(path).resolve()
    for d in [path, *path.parents][:4]:
        if (d / "dedup" / "report.json").is_file() or (d / "summary.json").is_file():
            return d
    return None


def data_provenance(job: str, data_path, recipe_path=None) -> dict:
    """What trained a checkpoint, for its meta.json: the data it read, the recipe that made that data (path +
    sha256) with the eval-set files that recipe decontaminated against (sha256 -> path, per eval set), and the
    dedup report (path + sha256 + its per-eval-set removal counts). eval.py reads this back to say, per
    benchmark split, whether training was decontaminated against it. Anything it cannot find is None."""
    from fileio import file_sha256 as sha
    root = find_data_root(data_path)
    record = {"job": job, "data": str(Path(data_path).resolve()), "data_root": str(root) if root else None,
              "recipe": None, "eval_files": None, "dedup_report": None}
    report_path = root / "dedup" / "report.json" if root else None
    if report_path is not None and report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
            record["dedup_report"] = {"path": str(report_path), "sha256": sha(report_path),
                                      "eval_sets": report.get("eval_sets", {}),
                                      "decontaminated": report.get("totals", {}).get("decontaminated")}
        except (OSError, ValueError) as e:
            print(f"warning: {report_path} cannot be read ({e}); provenance records no dedup report",
                  file=sys.stderr)
    if recipe_path and Path(recipe_path).is_file():
        from data_process.recipe import load_recipe, resolve_paths
        recipe_path = Path(recipe_path).resolve()
        record["recipe"] = {"path": str(recipe_path), "sha256": sha(recipe_path)}
        try:
            recipe = load_recipe(recipe_path)
            record["eval_files"] = {e.name: {sha(p): str(p) for p in resolve_paths(recipe, e.paths)}
                                    for e in recipe.eval_sets}
        except Exception as e:   # a recipe that no longer loads: recorded as such, not fatal to training
            print(f"warning: {recipe_path}: cannot read its eval sets ({e})", file=sys.stderr)
    if record["eval_files"] is not None and record["dedup_report"] is not None:   # the recipe that made this data?
        in_report = record["dedup_report"]["eval_sets"]
        differ = [n for n in set(in_report) | set(record["eval_files"])
                  if in_report.get(n, {}).get("files") != len(record["eval_files"].get(n, {}))]
        if differ:
            record["recipe_matches_report"] = False
            print(f"warning: {recipe_path}'s eval sets {sorted(differ)} do not match {report_path} (another recipe "
                  f"made this data?); pass the recipe that made it with --recipe", file=sys.stderr)
    return record


def provenance_chain(init_meta: dict | None, record: dict) -> list[dict]:
    """The provenance list of a new checkpoint: the one it started from, then this job's record. A record made
    without a recipe (SFT, DPO) whose data has the very dedup report (same sha256) an earlier job's recipe made
    inherits that recipe's eval files: the same pipeline run made both."""
    chain = list((init_meta or {}).get("provenance", []))
    report = record.get("dedup_report")
    if record.get("eval_files") is None and report:
        for prev in reversed(chain):
            if prev.get("eval_files") is not None and (prev.get("dedup_report") or {}).get("sha256") == \
                    report["sha256"] and prev.get("recipe_matches_report", True):
                record = {**record, "recipe": prev["recipe"], "eval_files": prev["eval_files"],
                          "recipe_from": prev.get("job")}
                break
    return [*chain, record]
