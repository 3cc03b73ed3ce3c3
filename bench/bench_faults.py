"""Benchmark of what the fault checks cost (issue 14, items 12-16): verifying finished work instead of trusting it.

Input: bench_read.py's mix of the real upstream samples (../shared/corpora-samples) repeated to 100 MB (20 MB with
--quick). Figures, all from this one run, each as a ratio to the work it guards, measured in the same run:
  - read step from scratch (the baseline), then a re-run that finds every corpus done: with the default "stat"
    fingerprint the re-run hashes every clean part (sha256, size) against its manifest; with `[run] fingerprint =
    "content"` it also hashes every input file
  - one token shard (50M tokens, 100 MB; 10M with --quick): a plain open (IndexedDataset), an open with the cheap
    check a loader gets from check_manifest (sizes, counts, sample digest), and the full sha256 check that the
    tokenize re-run and `inspect --verify` do. Files are in the page cache (just written): the figures are CPU
    cost; from a cold disk the full check runs at the disk's read speed, the cheap one reads under 1 MB.

    python bench/bench_faults.py            # 100 MB of input, 50M-token shard
    python bench/bench_faults.py --quick    # 20 MB, 10M tokens (under a minute)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from bench_read import build_input, input_bytes  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_step_figures(folder: Path) -> dict:
    from data_process import pipeline
    from data_process.recipe import load_recipe

    recipe = load_recipe(folder / "recipe.toml")
    mb = input_bytes(folder) / 1e6

    def read(mode: str) -> dict:
        recipe.run.fingerprint = mode
        with contextlib.redirect_stdout(io.StringIO()):   # the per-corpus table, printed by every run
            return pipeline.run(recipe, steps=["read"], progress=False)["read"]

    t0 = time.perf_counter()
    read("stat")
    read_s = time.perf_counter() - t0
    parts_mb = sum(p.stat().st_size for p in (recipe.data_dir / "clean").glob("*/part-*")) / 1e6
    rerun_stat = timed(lambda: read("stat"), repeat=3)
    read("content")   # another fingerprint scheme: the corpora are read once more
    rerun_content = timed(lambda: read("content"), repeat=3)
    assert all(c["skipped"] for c in read("content")["corpora"].values())
    shutil.rmtree(recipe.data_dir, ignore_errors=True)
    return {"input_mb": round(mb, 1), "clean_parts_mb": round(parts_mb, 1), "read_s": round(read_s, 2),
            "rerun_done_stat_s": round(rerun_stat, 3), "rerun_done_content_s": round(rerun_content, 3),
            "rerun_stat_vs_read": round(rerun_stat / read_s, 4),
            "rerun_content_vs_read": round(rerun_content / read_s, 4),
            "verify_parts_mb_per_s": round(parts_mb / rerun_stat, 1),
            "content_fingerprint_mb_per_s": round(mb / max(rerun_content - rerun_stat, 1e-9), 1)}


def shard_figures(folder: Path, tokens: int) -> dict:
    from data_process.shards import IndexedDataset, ShardWriter, verify_shard

    prefix = folder / "shard"
    rng = np.random.default_rng(0)
    with ShardWriter(prefix) as w:
        doc = 2000
        for _ in range(tokens // doc):
            w.add(rng.integers(0, 60000, doc, dtype=np.uint16))
    info = w.info
    plain = timed(lambda: IndexedDataset(prefix), repeat=5)
    cheap = timed(lambda: IndexedDataset(prefix, expect=info), repeat=5)
    full = timed(lambda: verify_shard(prefix, info, full=True), repeat=2)
    assert verify_shard(prefix, info, full=True) == []
    mb = prefix.with_suffix(".bin").stat().st_size / 1e6
    return {"shard_mb": round(mb, 1), "shard_documents": info["documents"], "open_ms": round(plain * 1e3, 2),
            "open_cheap_check_ms": round(cheap * 1e3, 2), "full_sha256_ms": round(full * 1e3, 1),
            "cheap_vs_open": round(cheap / plain, 2), "full_vs_open": round(full / plain, 1),
            "full_sha256_mb_per_s": round(mb / full, 1)}


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        folder = Path(tmp)
        build_input(folder, (20 if quick else 100) * 10**6)
        figures = {"read": read_step_figures(folder), "shard": shard_figures(folder, (10 if quick else 50) * 10**6)}
    r, s = figures["read"], figures["shard"]
    print(f"read step, {r['input_mb']} MB of real samples -> {r['clean_parts_mb']} MB of clean parts: "
          f"from scratch {r['read_s']} s (baseline)")
    print(f"  re-run, all done, stat fingerprint (sha256 of every clean part): {r['rerun_done_stat_s']} s = "
          f"{r['rerun_stat_vs_read']:.2%} of the read ({r['verify_parts_mb_per_s']} MB/s of parts)")
    print(f"  re-run, all done, content fingerprint (+ sha256 of every input): {r['rerun_done_content_s']} s = "
          f"{r['rerun_content_vs_read']:.2%} of the read (inputs hashed at {r['content_fingerprint_mb_per_s']} MB/s)")
    print(f"shard, {s['shard_mb']} MB .bin, {s['shard_documents']:,} documents: open {s['open_ms']} ms (baseline); "
          f"open + cheap check {s['open_cheap_check_ms']} ms ({s['cheap_vs_open']}x); full sha256 check "
          f"{s['full_sha256_ms']} ms ({s['full_vs_open']}x, {s['full_sha256_mb_per_s']} MB/s)")
    return {**r, **s}   # flat, for run_all's table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 MB of input and a 10M-token shard")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    figures = run(args.quick)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
