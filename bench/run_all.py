"""Run every benchmark and write bench/results.json + bench/results.md.

    python bench/run_all.py            # full benchmarks (tens of minutes on a 2-core CPU)
    python bench/run_all.py --quick    # smoke-sized (about a minute each)
    python bench/run_all.py --only read,dedup    # reruns these, keeps the other figures in results.json

Each bench/bench_<area>.py has `run(quick) -> dict` of named figures and prints its own details; this script
collects them (each in its own process, with that process's peak RSS), records the machine they were measured
on, and renders the Markdown table the README shows. A benchmark that fails is recorded and the others still run.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# (module, what it measures) in pipeline order
BENCHES = [
    ("read", "corpus read + clean"),
    ("quality", "quality operators vs data-juicer"),
    ("dedup", "exact + MinHash dedup"),
    ("tokenizer", "tokenizer compression"),
    ("tokenize", "tokenize to .bin/.idx"),
    ("ray", "Ray engine vs local"),
    ("faults", "fault checks (verify done work)"),
    ("model", "model fwd+bwd, decode"),
    ("pretrain", "pretrain step"),
    ("sft", "SFT and DPO"),
    ("grpo", "GRPO rollouts and step"),
    ("eval", "evaluation"),
    ("serve", "decode vs transformers, server"),
    ("decode", "decode vs llama.cpp"),
]


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
        info["ram_gb"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m.get('cpu', '?')} ({m.get('cpus')} cores, {m.get('ram_gb')} GB RAM), "
             f"torch {m.get('torch')}, {'GPU ' + m['cuda'] if m.get('cuda') else 'no GPU'}"
             f"{' — quick mode' if results['quick'] else ''}.", "",
             "| step | figure | value |", "|---|---|---|"]
    for name, title in BENCHES:
        r = results["benches"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {title} | error | {r['error'].splitlines()[-1][:120]} |")
            continue
        for key, value in r.items():
            if key.startswith("_"):
                continue
            lines.append(f"| {title} | {key} | {fmt(value)} |")
    return "\n".join(lines) + "\n"


def run_one(name: str, quick: bool) -> dict:
    """Run bench_<name>.run(quick) in a child process: its figures, plus the child's peak RSS (wait4 reports a
    process's own high-water mark, so each step's memory is its own; benchmarks that start worker processes
    also report those themselves)."""
    code = (f"import json, sys; sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]; import bench_{name} as b; "
            f"r = b.run(quick={quick}); print('@@RESULT@@' + json.dumps(r, default=str))")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:  # echo the benchmark's own report as it runs
        if line.startswith("@@RESULT@@"):
            lines.append(line)
        else:
            print(line, end="", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not lines:
        return {"error": f"bench_{name}.py exited with {proc.returncode}"}
    figures = json.loads(lines[-1][len("@@RESULT@@"):])
    figures["process_peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    figures["_seconds"] = round(time.perf_counter() - t0, 1)
    return figures


def hand_written(path: Path) -> str:
    """The sections of an existing results.md written by hand (everything from its first `## ` heading): a
    rerun regenerates the table above them and keeps them."""
    text = path.read_text() if path.is_file() else ""
    at = text.find("\n## ")
    return "" if at < 0 else "\n" + text[at + 1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(n for n, _ in BENCHES))
    p.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - {n for n, _ in BENCHES}
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    results = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "machine": machine(), "benches": {}}
    previous = args.out / "results.json"
    if only and previous.exists():   # a subset rerun replaces its own figures and keeps the others
        old = json.loads(previous.read_text())
        if old.get("quick") == args.quick:
            results["benches"] = old.get("benches", {})
    for name, title in BENCHES:
        if only and name not in only:
            continue
        print(f"\n=== {title} (bench/bench_{name}.py) ===", flush=True)
        figures = run_one(name, args.quick)
        figures["_date"] = results["date"]
        results["benches"][name] = figures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    md = to_markdown(results) + hand_written(args.out / "results.md")
    (args.out / "results.md").write_text(md)
    print("\n" + md)
    failed = [n for n, r in results["benches"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
