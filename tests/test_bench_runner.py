"""bench/run_all.py: each benchmark runs in its own process, its figures and peak RSS are collected."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run_all  # noqa: E402


def test_run_one_collects_figures_and_the_child_peak_rss(tmp_path, monkeypatch):
    (tmp_path / "bench_fake.py").write_text(
        "def run(quick=False):\n"
        "    block = bytearray(64 * 2**20)  # touch 64 MB so the peak RSS shows it\n"
        "    block[::4096] = b'x' * len(block[::4096])\n"
        "    print('working')\n"
        "    return {'things_per_s': 3.5, 'quick': quick}\n")
    (tmp_path / "bench_broken.py").write_text("def run(quick=False):\n    raise RuntimeError('boom')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    figures = run_all.run_one("fake", quick=True)
    assert figures["things_per_s"] == 3.5 and figures["quick"] is True
    assert figures["process_peak_rss_mb"] >= 64
    assert "error" in run_all.run_one("broken", quick=False)


def test_markdown_table_lists_every_figure_and_the_machine():
    results = {"date": "2026-11-22", "quick": False, "machine": {"cpu": "Some CPU", "cpus": 2, "ram_gb": 24,
                                                                 "torch": "2.13.0"},
               "benches": {"read": {"read_mb_per_s": 52.0, "_seconds": 3}, "dedup": {"error": "x\nboom"}}}
    md = run_all.to_markdown(results)
    assert "Some CPU" in md and "| corpus read + clean | read_mb_per_s | 52 |" in md and "boom" in md
    assert "_seconds" not in md


def test_only_reruns_a_subset_and_keeps_the_other_figures(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(name, quick):
        calls.append(name)
        return {"figure": len(calls)}
    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    assert run_all.main(["--out", str(tmp_path)]) == 0
    assert calls == [name for name, _ in run_all.BENCHES]
    assert run_all.main(["--only", "tokenize", "--out", str(tmp_path)]) == 0
    import json
    benches = json.loads((tmp_path / "results.json").read_text())["benches"]
    assert benches["tokenize"]["figure"] == len(run_all.BENCHES) + 1
    assert benches["read"]["figure"] == 1 and len(benches) == len(run_all.BENCHES)
    assert run_all.main(["--only", "read", "--quick", "--out", str(tmp_path)]) == 0   # quick never mixes with full
    assert list(json.loads((tmp_path / "results.json").read_text())["benches"]) == ["read"]


def test_a_rerun_keeps_the_hand_written_sections_of_results_md(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "run_one", lambda name, quick: {"figure": 1})
    (tmp_path / "results.md").write_text("old table\n\n## Dedup at scale\n\nfigures by hand\n\n## Ray\n\nmore\n")
    assert run_all.main(["--only", "read", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "old table" not in md and "| figure | 1 |" in md
    assert md.endswith("\n## Dedup at scale\n\nfigures by hand\n\n## Ray\n\nmore\n")
