"""Faults injected for real into the data pipeline (issue 14, items 12-18): deleted, truncated and bit-flipped
intermediate files, a second process holding the data dir, leftovers of killed runs, a step run without its
input, an input edited behind the fingerprint's back, and (the one simulated fault) a full disk raised as
ENOSPC at the file-write layer. Each test fails on the code before the fix."""
import builtins
import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from conftest import ROOT
from data_process import tokenize_docs
from data_process.records import RecordsError, iter_records
from data_process.shards import IndexedDataset, ShardError, ShardWriter, sample_digest, verify_shard

_spec = importlib.util.spec_from_file_location("data_process_cli", ROOT / "data_process.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def run_cli(data_dir: Path, *args) -> int:
    return cli.main(["--data-dir", str(data_dir), "--no-progress", *args])


def tree_bytes(root: Path, pattern: str = "*") -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()}


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole pipeline on the default recipe (the embedded samples), run once; tests work on copies."""
    data = tmp_path_factory.mktemp("built") / "data"
    assert run_cli(data) == 0
    return data


@pytest.fixture
def data(built, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(built, copy)
    return copy


# ----------------------------------------------------------------------------- 12: "already done" checks verify

def test_deleted_dedup_part_is_redone_and_never_wipes_the_shards_or_sft_rows(data, capsys, caplog):
    shards, sft = tree_bytes(data / "pretrain", "*/*"), tree_bytes(data / "sft")
    dedup_parts = tree_bytes(data / "dedup", "*/part-*")
    (data / "dedup/wiki_zh/part-00000.jsonl.zst").unlink()
    (data / "dedup/minimind_sft/part-00000.jsonl.zst").unlink()   # an SFT corpus of stage "general"
    # a later step alone refuses, naming the step that makes its input, and touches nothing
    assert run_cli(data, "--steps", "tokenize") == cli.EXIT_MISSING_INPUT
    err = capsys.readouterr().err
    assert "dedup/wiki_zh/part-00000.jsonl.zst: missing" in err and "--steps dedup" in err
    assert run_cli(data, "--steps", "stage") == cli.EXIT_MISSING_INPUT
    assert tree_bytes(data / "pretrain", "*/*") == shards
    # the whole pipeline notices, redoes dedup, and everything downstream comes out as before
    capsys.readouterr()
    assert run_cli(data) == 0
    assert "dedup/wiki_zh/part-00000.jsonl.zst: missing; running dedup again" in caplog.text
    assert tree_bytes(data / "dedup", "*/part-*") == dedup_parts
    assert tree_bytes(data / "pretrain", "*/*") == shards
    assert tree_bytes(data / "sft") == sft


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra"])
def test_damaged_clean_part_is_not_done_and_is_read_again(data, capsys, damage):
    part = data / "clean/wiki_zh/part-00000.jsonl.zst"
    before = tree_bytes(data / "clean", "*/part-*")
    if damage == "truncate":
        os.truncate(part, part.stat().st_size - 7)
    elif damage == "flip":
        flip_bit(part, part.stat().st_size // 2)
    elif damage == "delete":
        part.unlink()
    else:   # a stray part that the manifest does not list would be read by every later step
        shutil.copy(part, part.with_name("part-00001.jsonl.zst"))
    assert run_cli(data, "--steps", "read") == 0
    out, err = capsys.readouterr()
    assert "wiki_zh (done)" not in out and "baidubaike (done)" in out
    assert "clean/wiki_zh/part-0000" in err and "reading the corpus again" in err
    assert tree_bytes(data / "clean", "*/part-*") == before


def test_truncated_sft_csv_is_staged_again(data, capsys):
    csv = data / "sft/general.csv"
    before = csv.read_bytes()
    os.truncate(csv, len(before) // 2)
    assert run_cli(data, "--steps", "stage") == 0
    assert "sft/general.csv" in capsys.readouterr().out
    assert csv.read_bytes() == before


# ----------------------------------------------------------------------------- 13: zstd content checksum

def test_clean_parts_carry_the_zstd_checksum_so_no_bit_flip_decodes_silently(data):
    part = data / "clean/medical_dialogue/part-00000.jsonl.zst"
    raw = part.read_bytes()
    assert zstandard.get_frame_parameters(raw).has_checksum   # zstandard's own reading of the frame header
    original = list(iter_records(part))
    rng = random.Random(0)
    silent = 0
    for _ in range(300):
        flip_bit(part, rng.randrange(len(raw)), rng.randrange(8))
        try:
            silent += list(iter_records(part)) != original
        except RecordsError:
            pass
        part.write_bytes(raw)
    assert silent == 0


# ----------------------------------------------------------------------------- 14: shard sha256 and the cheap check

def test_flipped_bit_in_a_shard_fails_loaders_inspect_verify_and_is_redone(data, capsys):
    corpus = data / "pretrain/wiki_zh"
    before = tree_bytes(corpus)
    flip_bit(corpus / "train-00000.bin", 101)
    with pytest.raises(tokenize_docs.ManifestError, match="corrupted"):
        tokenize_docs.check_manifest(corpus)          # what pretrain.py calls before opening the shards
    capsys.readouterr()
    assert cli.main(["inspect", str(corpus), "--verify", "--samples", "0", "--tokenizer", str(data / "tokenizer")]) == 1
    assert "train-00000: sampled content differs from the digest the manifest recorded (corrupted)" in \
        capsys.readouterr().out
    assert run_cli(data, "--steps", "tokenize") == 0
    assert tree_bytes(corpus) == before


def test_loader_cheap_check_catches_sampled_damage_and_full_check_catches_any_bit(tmp_path):
    prefix = tmp_path / "big"
    rng = random.Random(1)
    with ShardWriter(prefix) as w:
        for _ in range(400):
            w.add([rng.randrange(60000) for _ in range(2500)])   # 2 MB of .bin: most bytes are not sampled
    info = w.info
    assert IndexedDataset(prefix, expect=info).num_tokens == 1_000_000 and verify_shard(prefix, info, full=True) == []
    assert info["sample_sha256"] == sample_digest(prefix)
    bin_file = prefix.with_suffix(".bin")
    flip_bit(bin_file, 300_000)                       # between two sampled blocks
    IndexedDataset(prefix, expect=info)               # the cheap check does not read it ...
    assert "sha256" in verify_shard(prefix, info, full=True)[0]   # ... the full one does
    flip_bit(bin_file, 300_000)
    flip_bit(bin_file, 10)                            # inside the first sampled block
    with pytest.raises(ShardError, match="sampled content"):
        IndexedDataset(prefix, expect=info)
    flip_bit(bin_file, 10)
    info_other = {**info, "documents": info["documents"] + 1}
    with pytest.raises(ShardError, match="documents"):
        IndexedDataset(prefix, expect=info_other)


# ----------------------------------------------------------------------------- 15: the data dir lock

HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from fileio import DirLock
lock = DirLock(sys.argv[2], "data_process.py --steps read (the other run)").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli(data, "--steps", "read") == cli.EXIT_LOCKED
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err and "(the other run)" in err and "started" in err
        assert not (data / "clean").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert run_cli(data, "--steps", "read") == 0
        assert f"took over the lock of a run that died: pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- 17: full disk, stale temporaries

class _FullDisk:
    """A file opened for writing whose writes fail as a full disk does (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("step", ["read", "tokenize"])
def test_full_disk_is_one_line_naming_the_path_with_its_own_exit_code(data, monkeypatch, capsys, step):
    target = data / ("clean" if step == "read" else "pretrain")
    before = tree_bytes(target, "*/*")
    shutil.rmtree(target)
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(m in mode for m in "wax") and str(file).startswith(str(target)):
            return _FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    assert run_cli(data, "--steps", step) == cli.EXIT_DISK_FULL   # the read step: in its pool workers
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: the disk is full: could not write " + str(target)) and "free on that filesystem" in err
    assert "it needed about" in err
    assert not [p for p in data.rglob("*") if ".tmp-" in p.name]
    monkeypatch.undo()
    assert run_cli(data, "--steps", step) == 0
    assert tree_bytes(target, "*/*") == before
    assert f"{cli.EXIT_DISK_FULL} the disk is full" in cli.build_parser().format_help()


def test_temporaries_left_by_killed_runs_are_removed_at_start(data, capsys):
    stale = [data / ".summary.json.tmp-999", data / "rejects/.wiki_zh.jsonl.tmp-12",
             data / "pretrain/wiki_zh/.manifest.json.tmp-5", data / "pretrain/wiki_zh/.train-00001.bin.tmp-77",
             data / "clean/wiki_zh/.part-00000.jsonl.zst.tmp-3"]
    for p in stale:
        p.write_bytes(b"half")
    keep = data / "pretrain/wiki_zh/notes.txt"   # not ours: left alone
    keep.write_text("x")
    assert run_cli(data, "--steps", "read") == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    assert f"removed {len(stale)} temporary file(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 18: a step without its input

def test_step_without_its_input_is_an_error_naming_the_step_to_run(tmp_path, capsys):
    data = tmp_path / "data"
    for step in ("dedup", "tokenizer", "tokenize", "stage"):
        assert run_cli(data, "--steps", step) == cli.EXIT_MISSING_INPUT
        err = capsys.readouterr().err
        assert f"the {step} step cannot run" in err and "--steps read" in err
    assert sorted(p.name for p in data.iterdir()) == [".lock"]   # nothing was written
    assert run_cli(data, "--steps", "read,dedup") == 0
    assert run_cli(data, "--steps", "tokenize") == cli.EXIT_MISSING_INPUT
    assert "tokenizer.model is missing: run `python data_process.py --steps tokenizer`" in capsys.readouterr().err
    assert not (data / "pretrain").exists()


# ----------------------------------------------------------------------------- 16: content fingerprint

def test_content_fingerprint_sees_an_edit_that_keeps_size_and_mtime(tmp_path, samples, capsys):
    src = tmp_path / "web.jsonl"
    shutil.copy(samples / "skywork-zh-web/zh_general.jsonl", src)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[run]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[[corpus]]\nname = "web"\nreader = "text_jsonl"\npaths = ["{src}"]\n')

    def read(mode):
        assert cli.main(["--recipe", str(recipe), "--steps", "read", "--no-progress",
                         "--set", f"run.fingerprint={mode!r}"]) == 0
        return "web (done)" in capsys.readouterr().out

    def edit_like_rsync_a(new: str):   # same size and mtime, other text (what `cp -p`/`rsync -a` of an edit leave)
        st = src.stat()
        text = src.read_text(encoding="utf-8")
        old = next(c for c in text if "\u4e00" <= c <= "\u9fff" and c != new)
        src.write_text(text.replace(old, new, 1), encoding="utf-8")
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert src.stat().st_size == st.st_size

    def clean_text():
        return "".join(r["text"] for r in iter_records(tmp_path / "data/clean/web"))

    assert not read("stat")
    first = clean_text()
    edit_like_rsync_a("\u9f0e")
    assert read("stat") and clean_text() == first     # the documented blind spot of the default
    assert not read("content")                        # another fingerprint scheme: read once
    assert read("content")
    edited = clean_text()
    assert edited != first and edited.count("\u9f0e") == first.count("\u9f0e") + 1
    edit_like_rsync_a("\u9f10")
    assert not read("content")                        # the edit is seen
    assert clean_text().count("\u9f10") == edited.count("\u9f10") + 1
    manifest = json.loads((tmp_path / "data/clean/web/manifest.json").read_text())
    assert set(manifest["inputs"][0]) == {"path", "bytes", "sha256"}


def test_corrupted_tokenizer_model_is_made_again_and_the_shards_kept(data, capsys):
    model = data / "tokenizer/tokenizer.model"
    before, shards = model.read_bytes(), tree_bytes(data / "pretrain", "*/*")
    flip_bit(model, len(before) // 2)
    assert run_cli(data, "--steps", "tokenizer,tokenize") == 0
    assert "tokenizer: trained" in capsys.readouterr().out
    assert model.read_bytes() == before                # the same recipe makes the same model ...
    assert tree_bytes(data / "pretrain", "*/*") == shards   # ... so the shards made with it stand


def test_unfinished_dedup_is_not_silently_replaced_by_the_clean_records(data, capsys):
    shards = tree_bytes(data / "pretrain", "*/*")
    (data / "dedup/report.json").unlink()   # what a dedup killed before its last write leaves
    assert run_cli(data, "--steps", "tokenize") == cli.EXIT_MISSING_INPUT
    assert "(the dedup step did not finish): run `python data_process.py --steps dedup`" in capsys.readouterr().err
    assert run_cli(data, "--steps", "dedup,tokenize") == 0
    assert tree_bytes(data / "pretrain", "*/*") == shards
