"""The read step end to end: CLI, accounting, determinism across worker counts, resume, kill -9 and re-run;
plus the recipe parser and the record shards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

import importlib.util

from conftest import ROOT
from data_process import pipeline
from data_process.records import iter_records, write_parts
from data_process.recipe import RecipeError, load_recipe, parse_recipe

# the CLI script, loaded under another name (`import data_process` is the package beside it)
_spec = importlib.util.spec_from_file_location("data_process_cli", ROOT / "data_process.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def outputs(data_dir: Path) -> dict:
    """Bytes of every part and reject file (manifests hold timings-free metadata; compared separately)."""
    files = sorted((data_dir / "clean").glob("*/part-*.jsonl.zst")) + sorted((data_dir / "rejects").glob("*.jsonl"))
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in files}


def check_accounting(data_dir: Path, summary_read: dict) -> None:
    for name, c in summary_read["corpora"].items():
        assert c["kept"] + c["rejected"] == c["read"], name
        assert sum(c["rejected_by_reason"].values()) == c["rejected"]
        assert sum(1 for _ in iter_records(data_dir / "clean" / name)) == c["kept"]
        rejects = (data_dir / "rejects" / f"{name}.jsonl").read_text().splitlines()
        assert len(rejects) == c["rejected"]
        for line in rejects:
            r = json.loads(line)
            assert r["file"] and r["reason"] and ({"line", "item", "row", "offset", "id"} & set(r))
        manifest = json.loads((data_dir / "clean" / name / "manifest.json").read_text())
        assert manifest["counts"]["read"] == c["read"]


def test_bare_cli_reads_every_embedded_corpus(tmp_path, capsys):
    rc = cli.main(["--steps", "read", "--data-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    read = summary["read"]
    recipe = load_recipe(ROOT / "config/recipe.toml", root=ROOT)
    assert list(read["corpora"]) == [c.name for c in recipe.corpora]
    for name, c in read["corpora"].items():
        assert c["kept"] > 0, name
        assert name in out
    check_accounting(tmp_path, read)
    assert read["corpora"]["c4_zh"]["rejected_by_reason"] == {"bad_json": 1}
    assert "TOTAL" in out and "bad_json 1" in out
    for record in iter_records(tmp_path / "clean" / "medical_dialogue"):
        assert record["corpus"] == "medical_dialogue" and record["kind"] == "conv"
    # a second run finds every corpus done and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "clean").rglob("*")}
    assert cli.main(["--steps", "read", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    assert all(c["skipped"] for c in json.loads((tmp_path / "summary.json").read_text())["read"]["corpora"].values())
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "clean").rglob("*")}


def write_recipe(tmp_path: Path, corpora: str, extra: str = "") -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f'[run]\ndata_dir = "{tmp_path / "data"}"\nworkers = 2\n{extra}\n{corpora}')
    return path


def big_jsonl(samples: Path, path: Path, copies: int) -> Path:
    base = (samples / "skywork-zh-web/zh_general.jsonl").read_bytes()
    extra = b'{"text": "broken\n{"text": ["x"]}\n{"text": "short"}\n'
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(base)
            f.write(extra)
    return path


def test_output_is_identical_whatever_the_worker_count(tmp_path, samples):
    big_jsonl(samples, tmp_path / "web.jsonl", 4)
    corpora = (f'[[corpus]]\nname = "web"\nreader = "text_jsonl"\npaths = ["{tmp_path}/web.jsonl"]\n'
               f'[[corpus]]\nname = "dlg"\nreader = "medical_dialogue_csv"\nrole = "sft"\n'
               f'paths = ["{samples}/toyhom-medical-dialogue/*.csv"]\n')
    recipe = load_recipe(write_recipe(tmp_path, corpora))
    results = []
    for workers in (1, 2):
        recipe.data_dir = tmp_path / f"data{workers}"
        summary = pipeline.run(recipe, steps=["read"], workers=workers, progress=False, chunk_bytes=300_000)
        check_accounting(recipe.data_dir, summary["read"])
        results.append(outputs(recipe.data_dir))
    assert results[0] == results[1]
    assert len([k for k in results[0] if k.startswith("clean/web/part-")]) > 3  # really split into ranges
    read = json.loads((tmp_path / "data2/summary.json").read_text())["read"]["corpora"]
    assert read["web"]["rejected_by_reason"] == {"bad_json": 4, "too_short": 4, "wrong_type": 4}
    assert read["dlg"]["kept"] == 7644


def test_changed_settings_or_inputs_redo_only_that_corpus(tmp_path, samples):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "第一篇文档的正文内容。"}\n')
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "第二篇文档的正文内容。"}\n')
    corpora = "".join(f'[[corpus]]\nname = "{n}"\nreader = "text_jsonl"\npaths = ["{tmp_path}/{n}.jsonl"]\n' for n in "ab")
    recipe = load_recipe(write_recipe(tmp_path, corpora))
    pipeline.run(recipe, steps=["read"], progress=False)
    b.write_text('{"text": "第二篇文档的正文内容。"}\n{"text": "新增的一篇文档内容。"}\n')
    read = pipeline.run(recipe, steps=["read"], progress=False)["read"]["corpora"]
    assert read["a"]["skipped"] and not read["b"]["skipped"] and read["b"]["kept"] == 2
    recipe.corpora[0].clean.min_chars = 50
    read = pipeline.run(recipe, steps=["read"], progress=False)["read"]["corpora"]
    assert not read["a"]["skipped"] and read["a"]["rejected_by_reason"] == {"too_short": 1}
    read = pipeline.run(recipe, steps=["read"], progress=False, force=True)["read"]["corpora"]
    assert not read["a"]["skipped"] and not read["b"]["skipped"]


def test_nothing_readable_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"not json\n")
    corpora = (f'[[corpus]]\nname = "empty"\nreader = "text_jsonl"\npaths = ["{tmp_path}/nothing/*.jsonl"]\n'
               f'[[corpus]]\nname = "bad"\nreader = "text_jsonl"\npaths = ["{bad}"]\n')
    rc = cli.main(["--recipe", str(write_recipe(tmp_path, corpora)), "--steps", "read", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nothing at all could be read" in err and "no file matches" in err and "bad_json" in err


def test_bad_recipe_or_step_exits_2(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text('[clean]\nmin_char = 5\n')
    assert cli.main(["--recipe", str(path), "--steps", "read"]) == 2
    assert "min_char" in capsys.readouterr().err
    assert cli.main(["--steps", "read,frobnicate", "--data-dir", str(tmp_path)]) == 2


def test_empty_and_absurdly_long_records_are_counted_rejects(tmp_path):
    path = tmp_path / "odd.jsonl"
    lines = [{"text": ""}, {"text": "   \u200b  "}, {"text": "长" * 3_000_000}, {"text": "正常长度的一篇中文文档。"}]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    corpora = f'[[corpus]]\nname = "odd"\nreader = "text_jsonl"\npaths = ["{path}"]\n'
    recipe = load_recipe(write_recipe(tmp_path, corpora))
    read = pipeline.run(recipe, steps=["read"], progress=False)["read"]
    c = read["corpora"]["odd"]
    assert (c["read"], c["kept"]) == (4, 1)
    assert c["rejected_by_reason"] == {"too_long": 1, "too_short": 2}
    check_accounting(recipe.data_dir, read)


def test_inspect_subcommand_is_delegated(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out.lower()


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from data_process import pipeline
from data_process.recipe import load_recipe
recipe = load_recipe({recipe!r})
pipeline.run(recipe, steps=["read"], workers=2, progress=False, chunk_bytes=250_000)
"""


@pytest.mark.slow
def wait_until_gone(pgid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process group {pgid} still alive after SIGKILL")


def test_kill_9_mid_run_then_rerun_gives_identical_output_and_no_partial_files(tmp_path, samples):
    big_jsonl(samples, tmp_path / "web.jsonl", 24)  # ~23 MB, ~60 units
    corpora = f'[[corpus]]\nname = "web"\nreader = "text_jsonl"\npaths = ["{tmp_path}/web.jsonl"]\n'
    recipe_path = write_recipe(tmp_path, corpora)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), recipe=str(recipe_path)))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    corpus_dir = tmp_path / "data/clean/web"
    deadline = time.time() + 60
    done_units = []
    while time.time() < deadline and proc.poll() is None:
        done_units = list(corpus_dir.glob(".staging-*/unit-*.json"))
        if len(done_units) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until_gone(proc.pid)   # its pool workers hold the data dir's lock until they are gone too
    assert not (corpus_dir / "manifest.json").exists()
    # every file under a final name is complete: units with their counts file decode fully
    staging = next(corpus_dir.glob(".staging-*"))
    finished = sorted(staging.glob("unit-*.json"))
    assert len(finished) >= 5
    for counts in finished:
        unit = counts.with_name(counts.name.replace(".json", ".jsonl.zst"))
        assert sum(1 for _ in iter_records([unit])) == orjson.loads(counts.read_bytes())["kept"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in staging.glob("unit-*.jsonl.zst")
              if p.with_name(p.name.replace(".jsonl.zst", ".json")).exists()}
    # two finished units damaged while the run was down: one bit flipped in one's records (same size), a line
    # added to the other's rejects file. The re-run must redo them, not trust their counts files.
    flipped, appended = sorted(mtimes)[:2]
    data = bytearray((staging / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    (staging / flipped).write_bytes(bytes(data))
    with open(staging / appended.replace(".jsonl.zst", ".rejects.jsonl"), "ab") as f:
        f.write(b'{"reason": "not this unit\'s"}\n')

    recipe = load_recipe(recipe_path)
    summary = pipeline.run(recipe, steps=["read"], workers=2, progress=False, chunk_bytes=250_000)
    check_accounting(recipe.data_dir, summary["read"])
    assert not list(corpus_dir.glob(".*")) and not list((tmp_path / "data/rejects").glob(".*"))
    # units finished before the kill were not redone (part k is unit k here: every unit keeps records), but for
    # the two damaged ones
    for name, mtime in mtimes.items():
        part = corpus_dir / name.replace("unit-", "part-")
        assert (part.stat().st_mtime_ns == mtime) == (name not in (flipped, appended)), name

    recipe.data_dir = tmp_path / "reference"
    pipeline.run(recipe, steps=["read"], workers=1, progress=False, chunk_bytes=250_000)
    assert outputs(tmp_path / "data") == outputs(tmp_path / "reference")


# ---------------------------------------------------------------- recipe


def test_default_recipe_parses_with_every_contract_table():
    r = load_recipe(ROOT / "config/recipe.toml", root=ROOT)
    assert r.data_dir == ROOT / "data" and r.run.workers == 2
    names = {c.name: c for c in r.corpora}
    for name in ["wiki_zh", "baidubaike", "c4_zh", "wudao", "skypile", "medical_pretrain", "minimind_pretrain",
                 "medical_books", "guidelines"]:
        assert names[name].role == "pretrain"
    for name, stage in [("medical_finetune", "medical"), ("medical_dialogue", "medical_dialogue"),
                        ("minimind_sft", "general"), ("minimind_r1", "reasoning")]:
        assert names[name].role == "sft" and names[name].stage == stage
    assert names["medical_reward"].role == "dpo" and names["medical_reward"].stage == "medical"
    assert names["guidelines"].priority > names["medical_books"].priority > names["wiki_zh"].priority \
        > names["c4_zh"].priority
    assert {e.name for e in r.eval_sets} == {"ceval", "cmmlu"}
    assert r.dedup.threshold == 0.8 and r.sft.stages[0] == "general" and r.raw["tokenize"]["val_fraction"] == 0.01


def test_recipe_rejects_unknown_keys_and_wrong_types_and_merges_corpus_clean(tmp_path):
    with pytest.raises(RecipeError, match="min_char"):
        parse_recipe({"clean": {"min_char": 3}}, tmp_path)
    with pytest.raises(RecipeError, match="unknown table"):
        parse_recipe({"corpora": []}, tmp_path)
    with pytest.raises(RecipeError, match="min_chars: expected an integer"):
        parse_recipe({"clean": {"min_chars": "3"}}, tmp_path)
    with pytest.raises(RecipeError, match="role"):
        parse_recipe({"corpus": [{"name": "a", "reader": "text_jsonl", "paths": ["x"], "role": "chat"}]}, tmp_path)
    with pytest.raises(RecipeError, match="unique"):
        parse_recipe({"corpus": [{"name": "a", "reader": "r", "paths": []}] * 2}, tmp_path)
    with pytest.raises(RecipeError, match="paths"):
        parse_recipe({"corpus": [{"name": "a", "reader": "r"}]}, tmp_path)
    r = parse_recipe({"clean": {"min_chars": 20}, "corpus": [
        {"name": "a", "reader": "r", "paths": ["x"], "clean": {"min_zh_ratio": 0.0}},
        {"name": "b", "reader": "r", "paths": "y"}]}, tmp_path)
    assert r.corpora[0].clean.min_chars == 20 and r.corpora[0].clean.min_zh_ratio == 0.0
    assert r.corpora[1].clean.min_zh_ratio == 0.3 and r.corpora[1].paths == ["y"]


# ---------------------------------------------------------------- record shards


def test_write_parts_round_trip_atomic_and_removes_stale_parts(tmp_path):
    records = [{"id": str(i), "corpus": "c", "kind": "doc", "text": "中文" * i} for i in range(25)]
    paths = write_parts(iter(records), tmp_path, part_records=10)
    assert [p.name for p in paths] == ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"]
    assert list(iter_records(tmp_path)) == records
    assert list(iter_records([paths[1]])) == records[10:20]
    write_parts(iter(records[:5]), tmp_path, part_records=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl.zst"]

    def failing():
        yield records[0]
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        write_parts(failing(), tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []
