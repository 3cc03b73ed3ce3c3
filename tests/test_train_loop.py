"""train_loop: the WSD schedule, the optimizer groups, checkpoints (atomic, verified, refused when corrupted or
mismatched), the NaN stop, and exact resume in-process (fp16 grad scaler, grad accumulation)."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import SAMPLES

import checkpoint
import train_loop
from checkpoint import CheckpointError
from fileio import file_sha256
from train_loop import TrainConfig, TrainingDiverged, wsd_lr


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


def _lines():
    out = []
    for line in open(SAMPLES / "skywork-zh-web/zh_general.jsonl", encoding="utf-8"):
        out += [l for l in json.loads(line)["text"].split("\n") if l.strip()]
        if sum(map(len, out)) > 15_000:
            return out


@pytest.fixture(scope="module")
def tok():
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    return Tokenizer(train_sentencepiece(_lines(), 2000))


@pytest.fixture(scope="module")
def other_tok():
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    return Tokenizer(train_sentencepiece(_lines()[::-1], 2100))


class TextBatches:
    """Windows of real sample text, a pure function of (step, micro_step) like pretrain.MixtureLoader."""

    def __init__(self, tok, batch_size=4, seq_len=32):
        self.stream = np.array([t for l in _lines() for t in tok.encode(l) + [tok.eos_id]], dtype=np.int64)
        self.batch_size, self.seq_len, self.calls = batch_size, seq_len, 0

    def next_batch(self, step, micro_step):
        rng = np.random.default_rng([step, micro_step])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, self.batch_size)
        w = torch.from_numpy(np.stack([self.stream[s:s + self.seq_len + 1] for s in starts]))
        self.calls += 1
        return {"input_ids": w[:, :-1], "targets": w[:, 1:]}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _model(tok, seed=0):
    from model import Transformer, make_config
    torch.manual_seed(seed)
    return Transformer(make_config("tiny", tok.vocab_size))


def _cfg(out, **kw):
    base = dict(out_dir=str(out), total_steps=8, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                stable_steps=3, decay_steps=3, save_interval=3, eval_interval=0, keep_last=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [(r["step"], r["loss"]) for r in train_loop.read_jsonl(out / "metrics.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------- schedule, optimizer

def test_wsd_lr_warmup_stable_and_minicpm_exponential_decay():
    kw = dict(peak_lr=1e-3, warmup_steps=10, stable_steps=80, decay_steps=10, min_lr=1e-4)
    lrs = [wsd_lr(s, **kw) for s in range(110)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])   # linear warmup
    assert all(lr == 1e-3 for lr in lrs[10:90])                                  # stable
    # MiniCPM's exponential decay, written as a half-life: lr = peak * 0.5 ** (t / T_half)
    half_life = 10 * math.log(2) / math.log(10)
    assert lrs[90:100] == pytest.approx([1e-3 * 0.5 ** ((t + 1) / half_life) for t in range(10)])
    assert lrs[99] == pytest.approx(1e-4) and all(lr == 1e-4 for lr in lrs[100:])
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                       # never rises after warmup
    lin = [wsd_lr(s, **kw, decay="linear") for s in range(90, 100)]
    assert lin == pytest.approx(np.linspace(1e-3, 1e-4, 11)[1:])
    cos = [wsd_lr(s, **kw, decay="cosine") for s in (90, 99)]
    assert cos[0] < 1e-3 and cos[1] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="min_lr > 0"):
        wsd_lr(95, **{**kw, "min_lr": 0.0})


def test_weight_decay_only_on_matrices_and_embeddings(tok):
    model = _model(tok)
    opt = train_loop.make_optimizer(TrainConfig(out_dir="x", total_steps=1, weight_decay=0.1),
                                    model.parameters(), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert any(p is model.model.embed_tokens.weight for p in decayed["params"])


# ----------------------------------------------------------------------------- training, resume

def test_train_writes_metrics_plot_and_verified_checkpoints_keeping_the_last_k(tok, tmp_path):
    out = tmp_path / "run"
    (out / ".tmp-step-000003-999").mkdir(parents=True)   # what a save killed mid-way leaves behind
    summary = train_loop.train(_cfg(out, eval_interval=4), _model(tok), tok, TextBatches(tok),
                               val_fn=lambda m: {"val/sample/loss": 1.5}, meta={"kind": "base", "phase": "p"})
    assert summary["step"] == 8 and summary["tokens_seen"] == 8 * 4 * 32
    assert sorted(p.name for p in out.iterdir()) == [".lock", "final", "metrics.jsonl", "metrics.png", "step-000003",
                                                     "step-000006"]
    records = train_loop.read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(8))
    assert [r["lr"] for r in steps] == pytest.approx([train_loop.lr_at(_cfg(out), s) for s in range(8)])
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 for r in steps)
    assert [r["step"] for r in records if r.get("kind") == "val"] == [4, 8]
    model, tok2, meta = checkpoint.load_checkpoint(out / "final")
    assert meta["step"] == 8 and meta["phase"] == "p" and meta["kind"] == "base" and meta["chat"] is False
    assert meta["tokenizer_sha256"] == tok.sha256 == tok2.sha256
    assert checkpoint.param_digest(model) == summary["param_sha256"] == meta["param_sha256"]
    state = torch.load(out / "final/train_state.pt", weights_only=True)   # plain tensors and values only
    assert {"optimizer", "loader", "rng", "step", "tokens_seen"} <= set(state)


def test_resume_with_fp16_scaler_and_grad_accum_is_exact(tok, tmp_path):
    cfg = dict(dtype="fp16", grad_accum=2, total_steps=5, save_interval=2)
    train_loop.train(_cfg(tmp_path / "ref", **cfg), _model(tok), tok, TextBatches(tok))
    # an interrupted run: stop after step 2's checkpoint, then resume from it in a fresh model
    train_loop.train(_cfg(tmp_path / "cut", **{**cfg, "total_steps": 3}), _model(tok), tok, TextBatches(tok))
    import shutil
    shutil.rmtree(tmp_path / "cut/final")          # as if killed after step 3 was logged, before it was saved
    summary = train_loop.train(_cfg(tmp_path / "cut", **cfg), _model(tok, seed=123), tok, TextBatches(tok))
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")
    assert summary["param_sha256"] == checkpoint.verify_checkpoint(tmp_path / "ref/final")["param_sha256"]


def test_init_from_continues_step_and_optimizer_but_not_the_data_position(tok, tmp_path):
    train_loop.train(_cfg(tmp_path / "a", total_steps=8), _model(tok), tok, TextBatches(tok))
    train_loop.train(_cfg(tmp_path / "b1", total_steps=4), _model(tok), tok, TextBatches(tok))
    summary = train_loop.train(_cfg(tmp_path / "b2", total_steps=8, init_from=str(tmp_path / "b1/final")),
                               _model(tok, seed=9), tok, TextBatches(tok))
    assert summary["step"] == 8
    assert _losses(tmp_path / "b1") + _losses(tmp_path / "b2") == _losses(tmp_path / "a")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tok, tmp_path):
    def loss_fn(model, batch):
        loss, metrics = train_loop.default_loss(model, batch)
        return (loss * float("nan") if batch["step"] == 4 else loss), metrics

    class Batches(TextBatches):
        def next_batch(self, step, micro_step):
            return {**super().next_batch(step, micro_step), "step": step}

    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint is .*step-000003"):
        train_loop.train(_cfg(out), _model(tok), tok, Batches(tok), loss_fn=loss_fn)
    assert not (out / "final").exists()
    meta = checkpoint.verify_checkpoint(out / "step-000003")
    assert meta["step"] == 3
    assert max(r["step"] for r in train_loop.read_jsonl(out / "metrics.jsonl")) == 3   # the NaN step not logged


# ----------------------------------------------------------------------------- refusing bad checkpoints

@pytest.fixture
def ckpt(tok, tmp_path):
    train_loop.train(_cfg(tmp_path / "run", total_steps=2, save_interval=0), _model(tok), tok, TextBatches(tok))
    return tmp_path / "run/final"


def test_truncated_weights_are_refused(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is .* bytes, expected .*truncated"):
        checkpoint.load_checkpoint(ckpt)


def test_a_flipped_byte_is_refused(ckpt):
    path = ckpt / "train_state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="train_state.pt does not match its recorded sha256"):
        checkpoint.verify_checkpoint(ckpt)


def test_missing_meta_or_file_is_refused(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        checkpoint.load_checkpoint(ckpt)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        checkpoint.load_checkpoint(ckpt)


def test_checkpoint_with_another_tokenizer_is_refused(ckpt, tok, other_tok, tmp_path):
    # resuming or continuing with a different tokenizer
    with pytest.raises(CheckpointError, match="trained with tokenizer .* refusing to mix"):
        train_loop.train(_cfg(tmp_path / "x", total_steps=4, init_from=str(ckpt)), _model(other_tok), other_tok,
                         TextBatches(other_tok))
    # a checkpoint whose tokenizer copy was swapped (meta.json made to match the new file's size and hash)
    other_tok.save(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in ("tokenizer.model", "tokenizer_meta.json"):
        meta["files"][name] = {"bytes": (ckpt / name).stat().st_size,
                               "sha256": file_sha256(ckpt / name)}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not the tokenizer the model was trained with"):
        checkpoint.load_checkpoint(ckpt)


def test_a_corrupted_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_good_one(tok, tmp_path,
                                                                                                  capsys):
    ref = tmp_path / "ref"
    train_loop.train(_cfg(ref, total_steps=6), _model(tok), tok, TextBatches(tok))
    out = tmp_path / "run"
    train_loop.train(_cfg(out, total_steps=4), _model(tok), tok, TextBatches(tok))   # step-000003 + final (4)
    (out / "final/model.safetensors").write_bytes(b"\0" * 10)
    summary = train_loop.train(_cfg(out, total_steps=6), _model(tok), tok, TextBatches(tok))
    err = capsys.readouterr().err
    assert "final: model.safetensors is 10 bytes" in err and "moved it aside to final.bad-" in err
    bad = [p.name for p in out.iterdir() if p.name.startswith("final.bad-")]
    assert len(bad) == 1 and (out / bad[0] / "model.safetensors").read_bytes() == b"\0" * 10   # kept, not deleted
    assert _losses(out) == _losses(ref)   # resumed from step-000003: the same run as an uninterrupted one
    assert summary["param_sha256"] == checkpoint.verify_checkpoint(ref / "final")["param_sha256"]


def test_no_resume_moves_the_old_run_aside_and_deletes_nothing(tok, tmp_path, capsys):
    out = tmp_path / "run"
    train_loop.train(_cfg(out, total_steps=6), _model(tok), tok, TextBatches(tok))
    before = {d.name: checkpoint.verify_checkpoint(d)["param_sha256"] for _, d in checkpoint.list_checkpoints(out)}
    summary = train_loop.train(_cfg(out, total_steps=2, resume=False, tensorboard=True), _model(tok), tok,
                               TextBatches(tok))
    assert summary["step"] == 2
    assert [(s, d.name) for s, d in checkpoint.list_checkpoints(out)] == [(2, "final")]
    assert [r["step"] for r in train_loop.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    captured = capsys.readouterr()
    (aside,) = [p for p in out.iterdir() if p.name.startswith("abandoned-")]
    assert f"moved the old checkpoints and metrics of {out} to {aside.name}/" in captured.out
    assert {d.name: checkpoint.verify_checkpoint(d)["param_sha256"] for _, d in checkpoint.list_checkpoints(aside)
            } == before   # step-000003, step-000006 and final, intact
    assert [r["step"] for r in train_loop.read_jsonl(aside / "metrics.jsonl")] == list(range(6))
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:   # optional loggers are never required
        assert "tensorboard is not installed" in captured.err


# ----------------------------------------------------------------------------- one run per out dir

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from fileio import DirLock
DirLock({out!r}, "pretrain.py --phase stable").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tok, tmp_path, capsys):
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(train_loop.LockedError, match=rf"{out} is in use by another run: pid {holder.pid} on "
                                                         r".*`pretrain.py --phase stable`"):
            train_loop.train(_cfg(out, total_steps=2), _model(tok), tok, TextBatches(tok))
        assert not (out / "metrics.jsonl").exists() and checkpoint.list_checkpoints(out) == []
    finally:
        holder.kill()   # SIGKILL: the holder dies without releasing, as in a crash
        holder.wait()
    summary = train_loop.train(_cfg(out, total_steps=2), _model(tok), tok, TextBatches(tok))
    assert summary["step"] == 2
    err = capsys.readouterr().err
    assert f"was locked by a run that is no longer alive (pid {holder.pid}" in err and "taking it over" in err
    assert [r["step"] for r in train_loop.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    # released on exit: the next run takes it without a word about a dead holder
    train_loop.train(_cfg(out, total_steps=3), _model(tok), tok, TextBatches(tok))
    assert "taking it over" not in capsys.readouterr().err


def test_the_lock_is_reentrant_for_a_caller_that_locked_first(tok, tmp_path):
    out = tmp_path / "run"
    with train_loop.out_dir_lock(out, "sft.py medical"):   # sft.py/dpo.py lock before they write their caches
        assert train_loop.train(_cfg(out, total_steps=2), _model(tok), tok, TextBatches(tok))["step"] == 2
        with pytest.raises(train_loop.LockedError, match="sft.py medical"):   # another lock on it: refused
            from fileio import DirLock
            DirLock(out).acquire()


# ----------------------------------------------------------------------------- a full disk

DISK_FULL = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from tokenizer import Tokenizer
import checkpoint, train_loop
from fileio import DiskFullError
from test_train_loop import TextBatches, _cfg, _model
tok = Tokenizer.load({tok!r})
out = {out!r}
try:
    train_loop.train(_cfg(out, total_steps=4, save_interval=2, keep_last=3), _model(tok), tok, TextBatches(tok))
    print(json.dumps({{"error": None}}))
except DiskFullError as e:
    import os
    print(json.dumps({{"error": e.strerror, "errno": e.errno, "files": sorted(os.listdir(out)),
                      "step2": checkpoint.verify_checkpoint(out + "/step-000002")["step"]}}))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_names_the_path_and_leaves_the_previous_checkpoint_intact(tok, tmp_path):
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private tmpfs")
    tok.save(tmp_path / "tok")
    one = tmp_path / "one"
    train_loop.train(_cfg(one, total_steps=1, save_interval=0), _model(tok), tok, TextBatches(tok))
    ckpt_bytes = sum(p.stat().st_size for p in (one / "final").iterdir())
    size_kb = int(ckpt_bytes * 1.5 / 1024)   # room for one checkpoint (and metrics), not for two
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = DISK_FULL.format(root=str(ROOT), tests=str(ROOT / "tests"), tok=str(tmp_path / "tok"),
                              out=str(mnt / "run"))
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           f'mount -t tmpfs -o size={size_kb}k tmpfs "{mnt}" && exec "{sys.executable}" -c "$0"', script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "ermission" in proc.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errno"] == 28 and "inline_container" not in result["error"]
    assert result["error"].startswith(f"the disk is full: could not write {mnt / 'run' / 'final'} (")
    assert f"the previous checkpoint {mnt / 'run' / 'step-000002'} is intact" in result["error"]
    assert result["step2"] == 2                                          # it verifies: every file, every sha256
    assert not any(".tmp-" in f for f in result["files"])                # the half-written save was removed
