"""Shard inspection: report contents on real tokenized text, and the .bin/.idx/eos checks catching breakage."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SAMPLES
from data_process import inspect_data, tokenize_docs
from data_process.recipe import parse_recipe
from data_process.records import write_parts
from data_process.shards import write_shard

MODEL = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"


def web_texts():
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:60]


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    texts = web_texts()
    write_parts([{"id": f"w:{i}", "corpus": "web", "kind": "doc", "text": t} for i, t in enumerate(texts)],
                root / "docs" / "web")
    recipe = parse_recipe({"tokenize": {"val_fraction": 0.1, "shard_tokens": 15_000, "sft_as_pretrain": []},
                           "corpus": [{"name": "web", "reader": "jsonl", "paths": ["x"]}]}, root)
    tokenize_docs.run(recipe, root / "docs", MODEL, root / "pretrain", progress=False)
    return root / "pretrain", texts


def test_report_of_a_corpus_counts_decodes_and_checks(pretrain, capsys):
    out, texts = pretrain
    manifest = tokenize_docs.check_manifest(out / "web")
    assert inspect_data.main([str(out / "web"), "--tokenizer", str(MODEL), "--samples", "2", "--chars", "40"]) == 0
    report = capsys.readouterr().out
    total_docs = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert f"documents {total_docs:,}" in report and total_docs == len(texts)
    assert "length histogram" in report and "top 15 tokens" in report and "'，'" in report
    assert "check: OK" in report and "eos 2 ends every document" in report and "manifest counts match" in report
    samples = [block.split("\n", 1)[1][:40] for block in report.split("--- sample ")[1:]]
    assert len(samples) == 2 and all(any(t.startswith(s) for t in texts) for s in samples)


def test_samples_are_seeded(pretrain, capsys):
    out, _ = pretrain
    runs = []
    for seed in ("1", "1", "2"):
        inspect_data.main([str(out), "--tokenizer", str(MODEL), "--seed", seed, "--samples", "3"])
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_single_shard_uses_its_corpus_manifest(pretrain, capsys):
    out, _ = pretrain
    assert inspect_data.main([str(out / "web" / "train-00000.bin"), "--samples", "0"]) == 0
    report = capsys.readouterr().out
    assert "== train-00000: 1 shard(s) ==" in report and "eos 2 ends every document" in report


def test_truncated_bin_fails_the_check(pretrain, tmp_path, capsys):
    out, _ = pretrain
    shutil.copytree(out / "web", tmp_path / "web")
    bin_file = tmp_path / "web" / "train-00001.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-10])
    assert inspect_data.main([str(tmp_path / "web"), "--tokenizer", str(MODEL)]) == 1
    report = capsys.readouterr().out
    assert "check: FAILED" in report and "train-00001" in report and "bytes, but the .idx says" in report
    assert "manifest says train has" in report


def test_missing_or_misplaced_eos_and_out_of_vocab_ids_are_reported(tmp_path, capsys):
    write_shard(tmp_path / "s", [[5, 6, 2], [7, 8], [9, 2, 10, 2], [65400, 2]])
    assert inspect_data.main([str(tmp_path / "s"), "--tokenizer", str(MODEL), "--samples", "0"]) == 1
    report = capsys.readouterr().out
    assert "1 documents do not end with eos 2" in report
    assert "1 eos tokens inside documents" in report
    assert "token ids >= vocab size" in report


def test_unknown_path_is_a_clear_error(tmp_path, capsys):
    assert inspect_data.main([str(tmp_path / "nope")]) == 2
    assert "no shard" in capsys.readouterr().err


def test_module_entry_point_has_help():
    proc = subprocess.run([sys.executable, "-m", "data_process.inspect_data", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "corpus directory" in proc.stdout


def test_length_histogram_bins_are_powers_of_two():
    lines = inspect_data.length_histogram(np.array([1, 2, 3, 900, 1000]))
    assert lines[0].split()[0] == "1-1" and lines[-1].split()[0] == "512-1,023"
    assert lines[-1].endswith(" 2")
