"""Benchmark of the read step (issue 2): stream + parse + clean + write zstd JSONL parts, with accounting.

Input: the real upstream samples from ../shared/corpora-samples repeated into a temporary corpus set
(Chinese web JSONL, English C4 JSONL, alpaca SFT JSONL, Toyhom GB18030 CSVs, MedicalGPT DPO JSONL, a textbook
as plain text), 200 MB (and 1 GB in the full run). Each run is a fresh `python` process running
`pipeline.run(recipe, steps=["read"])`, so the figures include planning, fingerprints and finalization.

Figures, all from this one run:
  - read+clean MB/s (of input bytes) and documents/s with 2 workers (target >= 40 MB/s on 2 cores)
  - the same with 1 worker: the baseline, and the ratio 2 workers / 1 worker
  - parse-only MB/s: orjson.loads over the JSONL inputs on one core, no cleaning/writing (a floor for context)
  - peak RSS of the main process and of the largest worker, at 200 MB and at 1 GB of input (target < 1 GB)

    python bench/bench_read.py            # 200 MB and 1 GB (a few minutes)
    python bench/bench_read.py --quick    # 30 MB, under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))

# (corpus, reader, lang, role, sample file, share of the input bytes, output file name)
MIX = [
    ("web", "text_jsonl", "zh", "pretrain", "skywork-zh-web/zh_general.jsonl", 0.45, "web.jsonl"),
    ("c4_en", "text_jsonl", "en", "pretrain", "llamafactory-demo/c4_demo.jsonl", 0.10, "c4.jsonl"),
    ("firefly", "text_jsonl", "zh", "pretrain", "firefly/dummy_pretrain.jsonl", 0.05, "firefly.jsonl"),
    ("alpaca", "instruction_json", "zh", "sft", "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl", 0.10, "alpaca.jsonl"),
    ("dialogue", "medical_dialogue_csv", "zh", "sft", "toyhom-medical-dialogue/样例_内科5000-6000.csv", 0.15, "d{}.csv"),
    ("dpo", "sharegpt_pref_jsonl", "zh", "dpo", "medicalgpt/reward/dpo_zh_500.jsonl", 0.10, "dpo.jsonl"),
    ("book", "plain_text", "zh", "pretrain", "medicalgpt/pretrain/fever.txt", 0.05, "book.txt"),
]

RUN_SCRIPT = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from data_process import pipeline
from data_process.recipe import load_recipe
recipe = load_recipe({recipe!r})
t0 = time.perf_counter()
summary = pipeline.run(recipe, steps=["read"], workers={workers}, progress=False)
seconds = time.perf_counter() - t0
print("RESULT", json.dumps({{"seconds": seconds, "totals": summary["read"]["totals"],
    "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "cpu_seconds": sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
                       for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))}}))
"""


def with_newline(data: bytes) -> bytes:
    return data if data.endswith(b"\n") else data + b"\n"


def build_input(folder: Path, total_bytes: int) -> Path:
    """Write the corpus mix (about total_bytes) under folder and a recipe for it; returns the recipe path."""
    folder.mkdir(parents=True, exist_ok=True)
    corpora = []
    for name, reader, lang, role, sample, share, out_name in MIX:
        data = with_newline((SAMPLES / sample).read_bytes())
        target = int(total_bytes * share)
        cdir = folder / name
        cdir.mkdir(exist_ok=True)
        if reader == "medical_dialogue_csv":  # one department CSV per copy, as upstream ships six files
            for i in range(max(1, round(target / len(data)))):
                (cdir / out_name.format(i)).write_bytes(data)
        else:
            with open(cdir / out_name, "wb") as f:
                for _ in range(max(1, round(target / len(data)))):
                    f.write(data)
        corpora.append(f'[[corpus]]\nname = "{name}"\nreader = "{reader}"\npaths = ["{cdir}/*"]\n'
                       f'lang = "{lang}"\nrole = "{role}"\n')
    recipe = folder / "recipe.toml"
    recipe.write_text(f'[run]\ndata_dir = "{folder / "data"}"\nworkers = 2\n\n' + "\n".join(corpora))
    return recipe


def input_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for name, *_ in MIX for p in (folder / name).iterdir())


def run_read(recipe: Path, workers: int) -> dict:
    data_dir = recipe.parent / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    script = RUN_SCRIPT.format(root=str(ROOT), recipe=str(recipe), workers=workers)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    shutil.rmtree(data_dir, ignore_errors=True)
    return result


def parse_only_mb_per_s(folder: Path) -> float:
    """orjson.loads over every JSONL input, one core: the bare parsing floor."""
    import orjson

    size, t0 = 0, time.perf_counter()
    for name, reader, *_ in MIX:
        if reader in ("medical_dialogue_csv", "plain_text"):
            continue
        for path in (folder / name).iterdir():
            with open(path, "rb") as f:
                for line in f:
                    orjson.loads(line)
                    size += len(line)
    return size / 1e6 / (time.perf_counter() - t0)


def measure(folder: Path, workers: int) -> dict:
    recipe = folder / "recipe.toml"
    mb = input_bytes(folder) / 1e6
    r = run_read(recipe, workers)
    t = r["totals"]
    return {"input_mb": round(mb, 1), "mb_per_s": round(mb / r["seconds"], 1),
            "docs_per_s": round(t["read"] / r["seconds"]), "records_read": t["read"], "kept": t["kept"],
            "seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2),
            "mb_per_cpu_s": round(mb / r["cpu_seconds"], 1), "cores_used": round(r["cpu_seconds"] / r["seconds"], 2),
            "main_rss_mb": round(r["main_rss_mb"]),
            "worker_rss_mb": round(r["worker_rss_mb"])}


def run(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_read_"))
    results = {}
    try:
        small = tmp / "small"
        build_input(small, 30_000_000 if quick else 200_000_000)
        parse = parse_only_mb_per_s(small)
        one = measure(small, 1)
        two = measure(small, 2)
        print(f"input {two['input_mb']} MB ({two['records_read']} records)")
        print(f"  parse only (orjson, 1 core, JSONL part):  {parse:6.1f} MB/s")
        print(f"  read+clean, 1 worker (baseline):          {one['mb_per_s']:6.1f} MB/s  {one['docs_per_s']:8d} docs/s")
        print(f"  read+clean, 2 workers:                    {two['mb_per_s']:6.1f} MB/s  {two['docs_per_s']:8d} docs/s"
              f"  ratio to 1 worker {two['mb_per_s'] / one['mb_per_s']:.2f}x   (target >= 40 MB/s)")
        print(f"  CPU time: 1 worker {one['mb_per_cpu_s']} MB per CPU-second on {one['cores_used']} cores; "
              f"2 workers {two['mb_per_cpu_s']} MB per CPU-second on {two['cores_used']} cores "
              f"(x2 free cores = {2 * two['mb_per_cpu_s']:.1f} MB/s; load average now {os.getloadavg()[0]:.1f})")
        print(f"  peak RSS: main {two['main_rss_mb']} MB, largest worker {two['worker_rss_mb']} MB")
        results.update({
            "input_mb": two["input_mb"], "read_mb_per_s": two["mb_per_s"], "read_docs_per_s": two["docs_per_s"],
            "baseline_1worker_mb_per_s": one["mb_per_s"],
            "speedup_vs_1worker": round(two["mb_per_s"] / one["mb_per_s"], 2),
            "parse_only_mb_per_s": round(parse, 1), "read_mb_per_cpu_s": two["mb_per_cpu_s"],
            "baseline_1worker_mb_per_cpu_s": one["mb_per_cpu_s"], "cores_used_2workers": two["cores_used"],
            "load_average": round(os.getloadavg()[0], 1),
            "peak_rss_main_mb": two["main_rss_mb"], "peak_rss_worker_mb": two["worker_rss_mb"],
        })
        if not quick:
            shutil.rmtree(small)
            big = tmp / "big"
            build_input(big, 1_000_000_000)
            r = measure(big, 2)
            print(f"input {r['input_mb']} MB: read+clean 2 workers {r['mb_per_s']} MB/s, {r['docs_per_s']} docs/s, "
                  f"{r['mb_per_cpu_s']} MB per CPU-second on {r['cores_used']} cores; peak RSS main {r['main_rss_mb']} MB, "
                  f"largest worker {r['worker_rss_mb']} MB (load average {os.getloadavg()[0]:.1f})")
            results.update({"input_1gb_mb": r["input_mb"], "read_1gb_mb_per_s": r["mb_per_s"],
                            "read_1gb_mb_per_cpu_s": r["mb_per_cpu_s"],
                            "peak_rss_main_1gb_mb": r["main_rss_mb"], "peak_rss_worker_1gb_mb": r["worker_rss_mb"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30 MB of input only (under a minute)")
    args = p.parse_args(argv)
    print(json.dumps(run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
