"""Benchmark of `--engine ray` against the local engine (issue 20): the same pipeline run, same input, same machine.

Input: the real Chinese web and medical samples from ../shared/corpora-samples (SkyPile-style web JSONL, Firefly
web text, the MedicalGPT fever textbook) repeated into a temporary corpus set of `--size-mb` (default 200 MB;
1 GB, --size-mb 1000, takes over the 5-minute budget of the shared 2-core machine). Dedup runs its full
hashing pass (MinHash signatures, exact hashes, decontamination against C-Eval) but with its exact/near
decisions switched off, so the repeated copies all survive and the tokenize step also sees the whole input
(otherwise dedup would leave one copy and tokenize would measure nothing).

Each engine runs steps read,dedup,tokenizer,tokenize in a fresh `python` process with 2 workers (local: the
process pools, one pipeline.run per step so each step's CPU-seconds are known; ray: one pipeline.run on a local
Ray instance with 2 CPUs, started and shut down inside the measured time), `--repeat` times, alternating. Figures,
all from this one run: the best wall seconds per engine and per step, the ratio ray / local (overhead, target
<= 15%), input MB per CPU-second of each step on the local engine (robust to a busy machine: docs/scaling.md's
estimate uses them), and that every run wrote byte-identical shards.

    python bench/bench_ray.py                 # 200 MB, 2 runs per engine (about 5 minutes)
    python bench/bench_ray.py --size-mb 1000  # 1 GB
    python bench/bench_ray.py --quick         # 20 MB, one run each, about a minute (Ray start-up dominates)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))
WORKERS = 2
STEPS = ["read", "dedup", "tokenizer", "tokenize"]

# (corpus, reader, sample files, share of the input bytes)
MIX = [
    ("web", "text_jsonl", ["skywork-zh-web/zh_general.jsonl", "firefly/dummy_pretrain.jsonl"], 0.8),
    ("book", "plain_text", ["medicalgpt/pretrain/fever.txt"], 0.2),
]

RUN_SCRIPT = """
import json, resource, sys, threading, time
import psutil
sys.path.insert(0, {root!r})
from data_process import pipeline
from data_process.recipe import load_recipe

def cpu():
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

# CPU-seconds of the whole process tree (driver, pool workers or Ray's daemons and workers: Ray's are not reaped
# into RUSAGE_CHILDREN), sampled every 0.1 s per process; a process's last 0.1 s before it exits can be missed
seen, done = {{}}, threading.Event()
def sample():
    me = psutil.Process()
    while True:
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        if done.wait(0.1):
            return
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()

recipe = load_recipe({recipe!r})
t0 = time.perf_counter()
if {engine!r} == "local":   # one call per step: each step's CPU-seconds (the pools' workers are reaped children)
    summary, cpu_s = {{}}, {{}}
    for step in {steps!r}:
        c0 = cpu()
        summary.update(pipeline.run(recipe, steps=[step], workers={workers}, progress=False, engine="local"))
        cpu_s[step] = cpu() - c0
else:                        # one call: one Ray instance for the run, its start and stop inside the time
    summary = pipeline.run(recipe, steps={steps!r}, workers={workers}, progress=False, engine="ray")
    cpu_s = {{}}
seconds = time.perf_counter() - t0
done.set()
sampler.join()
print("RESULT", json.dumps({{"seconds": seconds, "steps": {{s: summary[s]["seconds"] for s in summary}},
                             "cpu_seconds": cpu_s, "tree_cpu_seconds": sum(seen.values()), "read_mb": summary["read"]["totals"]["bytes"] / 1e6,
                             "tokens": summary["tokenize"]["tokens"]}}))
"""


def build_input(folder: Path, total_bytes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    corpora = []
    for name, reader, samples, share in MIX:
        data = b"".join((SAMPLES / s).read_bytes().rstrip(b"\n") + b"\n" for s in samples)
        path = folder / f"{name}.{'jsonl' if reader == 'text_jsonl' else 'txt'}"
        with open(path, "wb") as f:
            for _ in range(max(1, round(total_bytes * share / len(data)))):
                f.write(data)
        corpora.append(f'[[corpus]]\nname = "{name}"\nreader = "{reader}"\npaths = ["{path}"]\n')
    recipe = folder / "recipe.toml"
    recipe.write_text(
        f'[run]\ndata_dir = "{folder / "data"}"\nworkers = {WORKERS}\n\n' + "\n".join(corpora) +
        f'\n[dedup]\nexact = false\nnear = false\n'
        f'[[eval_set]]\nname = "ceval"\nformat = "ceval"\npaths = ["{SAMPLES}/ceval-medical/*/*.csv"]\n'
        f'[tokenizer]\nvocab_size = 8000\nsample_chars = 2000000\n'
        f'[tokenize]\nsft_as_pretrain = []\n')
    return recipe


def shard_digest(data_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((data_dir / "pretrain").rglob("*")):
        if p.suffix in (".bin", ".idx"):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run_engine(recipe: Path, engine: str) -> dict:
    data_dir = recipe.parent / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    script = RUN_SCRIPT.format(root=str(ROOT), recipe=str(recipe), steps=STEPS, workers=WORKERS, engine=engine)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=recipe.parent)
    if proc.returncode != 0:   # say why: the run's own error, not only the command line
        raise RuntimeError(f"the {engine} run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["digest"] = shard_digest(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    return result


def run(quick: bool = False, size_mb: int | None = None, repeat: int | None = None) -> dict:
    size_mb = size_mb or (20 if quick else 200)
    repeat = repeat or (1 if quick else 2)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    runs = {"local": [], "ray": []}
    try:
        recipe = build_input(tmp, size_mb * 1_000_000)
        for i in range(repeat):   # alternating, so a change in the machine's load hits both engines
            for engine in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
                runs[engine].append(run_engine(recipe, engine))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    local = min(runs["local"], key=lambda r: r["seconds"])
    ray = min(runs["ray"], key=lambda r: r["seconds"])
    mb = local["read_mb"]
    print(f"input {mb:.0f} MB, {local['tokens']:,} tokens, {WORKERS} workers / 2 Ray CPUs, best of {repeat} "
          f"alternating runs each (load average {os.getloadavg()[0]:.1f})")
    print(f"  {'step':10s} {'local s':>8s} {'ray s':>8s} {'ray/local':>9s}  local MB per CPU-second")
    figures = {"input_mb": round(mb), "tokens": local["tokens"], "workers": WORKERS, "repeat": repeat}
    for step in STEPS:
        lo, ra = local["steps"][step], ray["steps"][step]
        per_cpu = mb / local["cpu_seconds"][step]
        print(f"  {step:10s} {lo:8.1f} {ra:8.1f} {ra / lo:9.2f}  {per_cpu:8.1f}")
        figures.update({f"{step}_local_s": round(lo, 1), f"{step}_ray_s": round(ra, 1),
                        f"{step}_ratio_ray_vs_local": round(ra / lo, 2),
                        f"{step}_local_mb_per_cpu_s": round(per_cpu, 1)})
    ratio = ray["seconds"] / local["seconds"]
    steps_local, steps_ray = sum(local["steps"].values()), sum(ray["steps"].values())
    print(f"  {'total':10s} {local['seconds']:8.1f} {ray['seconds']:8.1f} {ratio:9.2f}  "
          f"(ray includes starting and stopping its local instance; overhead {100 * (ratio - 1):+.0f}%, "
          f"target <= +15%)")
    print(f"  steps only {steps_local:.1f} s vs {steps_ray:.1f} s: ratio {steps_ray / steps_local:.2f}; Ray's start and "
          f"stop around them {ray['seconds'] - steps_ray:.1f} s (a fixed cost, whatever the input size)")
    print(f"  all runs, seconds: local {[round(r['seconds'], 1) for r in runs['local']]}, "
          f"ray {[round(r['seconds'], 1) for r in runs['ray']]}")
    cpu_local = min(r["tree_cpu_seconds"] for r in runs["local"])
    cpu_ray = min(r["tree_cpu_seconds"] for r in runs["ray"])
    print(f"  CPU-seconds of the whole process tree (least of the runs): local {cpu_local:.1f}, ray {cpu_ray:.1f}: "
          f"ratio {cpu_ray / cpu_local:.2f} (what Ray adds in work, whatever else loads the machine)")
    identical = len({r["digest"] for r in runs["local"] + runs["ray"]}) == 1
    print(f"  shards byte-identical across every run: {identical}")
    figures.update({"total_local_s": round(local["seconds"], 1), "total_ray_s": round(ray["seconds"], 1),
                    "ratio_ray_vs_local": round(ratio, 3), "overhead_pct": round(100 * (ratio - 1), 1),
                    "steps_ratio_ray_vs_local": round(steps_ray / steps_local, 3),
                    "ray_start_stop_s": round(ray["seconds"] - steps_ray, 1),
                    "tokens_per_cpu_s_tokenize": round(local["tokens"] / local["cpu_seconds"]["tokenize"]),
                    "cpu_local_s": round(cpu_local, 1), "cpu_ray_s": round(cpu_ray, 1),
                    "cpu_ratio_ray_vs_local": round(cpu_ray / cpu_local, 3),
                    "shards_identical": identical, "load_average": round(os.getloadavg()[0], 1)})
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 MB of input")
    p.add_argument("--size-mb", type=int, default=None, help="input size in MB (default 200; 20 with --quick)")
    p.add_argument("--repeat", type=int, default=None, help="runs per engine, alternating (default 2; 1 with --quick)")
    args = p.parse_args(argv)
    print(json.dumps(run(quick=args.quick, size_mb=args.size_mb, repeat=args.repeat), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
