"""The tokenize step on real samples with the real ChatGLM2 SentencePiece model: shards decode back to
the documents (checked with raw sentencepiece), hash split, sharding, byte-identical output for any worker
count or mode, reuse, resume after kill -9, bad records counted, manifest checks."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import xxhash

from conftest import ROOT, SAMPLES
from data_process import tokenize_docs
from data_process.recipe import parse_recipe
from data_process.records import RecordsError, write_parts
from data_process.shards import IndexedDataset, is_complete

MODEL = SAMPLES / "chatglm2-tokenizer" / "tokenizer.model"


def raw_sentencepiece():
    """Plain sentencepiece on the model as the project prepares it (no dummy prefix, chat pieces added)."""
    from tokenizer import Tokenizer
    return spm.SentencePieceProcessor(model_proto=Tokenizer.load(MODEL).model_bytes)


def web_texts():
    with open(SAMPLES / "skywork-zh-web" / "zh_general.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:120]


def medical_texts():
    lines = (SAMPLES / "medicalgpt" / "pretrain" / "fever.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:300]


def sft_conversations():
    out = []
    with open(SAMPLES / "medicalgpt" / "sft" / "medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 80:
                break
            turns = json.loads(line)["conversations"]
            msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
            out.append({"id": f"sft.jsonl:{i}", "corpus": "med_sft", "kind": "conv", "messages": msgs})
    return out


def docs(corpus, texts):
    return [{"id": f"{corpus}.jsonl:{i}", "corpus": corpus, "kind": "doc", "text": t} for i, t in enumerate(texts)]


def make_recipe(root, val_fraction=0.1, shard_tokens=20_000):
    raw = {"tokenize": {"val_fraction": val_fraction, "shard_tokens": shard_tokens, "sft_as_pretrain": ["medical", "general"]},
           "corpus": [{"name": "web", "reader": "jsonl", "paths": ["x"]},
                      {"name": "med", "reader": "text", "paths": ["x"]},
                      {"name": "med_sft", "reader": "sharegpt", "paths": ["x"], "role": "sft", "stage": "medical"},
                      {"name": "chat", "reader": "sharegpt", "paths": ["x"], "role": "sft", "stage": "general"}]}
    return parse_recipe(raw, root)


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_parts(docs("web", web_texts()), root / "web", part_records=50)
    write_parts(docs("med", medical_texts()), root / "med", part_records=100)
    write_parts(sft_conversations(), root / "med_sft", part_records=30)
    return root


@pytest.fixture(scope="module")
def reference(docs_root, tmp_path_factory):
    """One uninterrupted run with the default settings, compared against by other tests."""
    out = tmp_path_factory.mktemp("ref")
    report = tokenize_docs.run(make_recipe(docs_root), docs_root, MODEL, out, workers=2, progress=False)
    return out, report


def all_output_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def read_split(corpus_dir, split):
    manifest = tokenize_docs.check_manifest(corpus_dir)
    return [doc for name in manifest["splits"][split]["shards"] for doc in IndexedDataset(corpus_dir / name)]


def test_shards_hold_each_document_encoded_by_sentencepiece_then_eos(reference):
    out, report = reference
    sp = raw_sentencepiece()
    eos = sp.eos_id()
    for corpus, texts in (("web", web_texts()), ("med", medical_texts())):
        val = [t for t in texts if xxhash.xxh3_64_intdigest(t.encode()) < 0.1 * 2 ** 64]
        train = [t for t in texts if t not in val]
        for split, expected in (("train", train), ("val", val)):
            got = read_split(out / corpus, split)
            assert len(got) == len(expected)
            for ids, text in zip(got, expected):
                assert ids.dtype == np.uint16 and ids[-1] == eos
                assert ids[:-1].tolist() == sp.encode(text)
        manifest = tokenize_docs.check_manifest(out / corpus)
        assert manifest["splits"]["train"]["chars"] == sum(map(len, train))
        assert manifest["splits"]["val"]["chars"] == sum(map(len, val))
        assert report["corpora"][corpus]["documents"] == len(texts)
    assert 0 < report["corpora"]["med"]["val_documents"] < 0.25 * len(medical_texts())


def test_manifest_records_tokenizer_sources_and_settings(reference):
    out, _ = reference
    m = tokenize_docs.check_manifest(out / "web")
    from tokenizer import Tokenizer
    assert m["tokenizer_sha256"] == Tokenizer.load(MODEL).sha256
    assert m["dtype"] == "uint16" and m["eos_id"] == 2 and m["vocab_size"] >= 64789
    assert [s["file"] for s in m["sources"]] == ["web/part-00000.jsonl.zst", "web/part-00001.jsonl.zst",
                                                 "web/part-00002.jsonl.zst"]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["sources"])
    assert m["settings"]["val_fraction"] == 0.1 and m["settings"]["shard_tokens"] == 20_000
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["tokens"] == sum(m["shard_info"][n]["tokens"] for n in s["shards"])
        assert s["documents"] == sum(len(IndexedDataset(out / "web" / n)) for n in s["shards"])
    assert not (out / "web" / "progress.json").exists()


def test_large_corpus_is_split_into_shards_at_document_boundaries(reference):
    out, _ = reference
    m = tokenize_docs.check_manifest(out / "web")
    shards = m["splits"]["train"]["shards"]
    assert len(shards) >= 3 and shards[0] == "train-00000"
    for name in shards[:-1]:
        ds = IndexedDataset(out / "web" / name)
        assert ds.num_tokens >= 20_000 > ds.num_tokens - int(ds.doc_lengths[-1])
    assert m["splits"]["val"]["shards"][0] == "val-00000"


def test_sft_stage_is_written_as_pretrain_corpus_with_chat_template(reference):
    from tokenizer import Tokenizer
    out, report = reference
    tok = Tokenizer.load(MODEL)
    convs = sft_conversations()
    got = read_split(out / "sft_medical", "train") + read_split(out / "sft_medical", "val")
    assert len(got) == len(convs) == report["corpora"]["sft_medical"]["documents"]
    expected = {tuple(tok.render_chat(c["messages"]).ids + [tok.eos_id]) for c in convs}
    assert {tuple(ids.tolist()) for ids in got} == expected
    assert "sft_general" in report["corpora"] and report["corpora"]["sft_general"]["status"] == "no input"


def test_output_is_byte_identical_whatever_workers_mode_or_batch(docs_root, reference, tmp_path):
    ref_out, _ = reference
    expected = all_output_bytes(ref_out / "web")
    recipe = make_recipe(docs_root)
    from tokenizer import Tokenizer
    tok = Tokenizer.load(MODEL)
    settings = tokenize_docs.Settings(0.1, 20_000)
    parts = sorted((docs_root / "web").glob("part-*"))
    for i, (workers, mode, batch_chars) in enumerate([(1, "threads", 10**6), (2, "threads", 7_777),
                                                        (2, "processes", 30_000)]):
        out = tmp_path / f"o{i}"
        tokenize_docs.tokenize_corpus("web", parts, docs_root, tok, MODEL, out, settings, workers=workers,
                                 mode=mode, batch_chars=batch_chars, progress=False)
        assert all_output_bytes(out) == expected, (workers, mode, batch_chars)
    assert recipe.tokenize.shard_tokens == 20_000


def test_split_does_not_depend_on_document_order(docs_root, tmp_path):
    texts = medical_texts()
    write_parts(docs("med", texts[::-1]), tmp_path / "docs" / "med")
    recipe = make_recipe(tmp_path / "docs")
    tokenize_docs.run(recipe, tmp_path / "docs", MODEL, tmp_path / "out", progress=False)
    sp = raw_sentencepiece()
    val = {sp.decode(ids[:-1].tolist()) for ids in read_split(tmp_path / "out" / "med", "val")}
    ref = {t for t in texts if xxhash.xxh3_64_intdigest(t.encode()) < 0.1 * 2 ** 64}
    assert len(val) == len(ref) > 0


def test_rerun_keeps_finished_output(docs_root, tmp_path):
    recipe = make_recipe(docs_root)
    first = tokenize_docs.run(recipe, docs_root, MODEL, tmp_path, progress=False)
    stamp = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}
    again = tokenize_docs.run(recipe, docs_root, MODEL, tmp_path, progress=False)
    assert {r["status"] for r in again["corpora"].values() if r["status"] != "no input"} == {"kept"}
    assert again["corpora"]["web"]["tokens"] == first["corpora"]["web"]["tokens"]
    assert stamp == {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}


def test_changed_settings_retokenize_and_drop_old_shards(docs_root, tmp_path):
    tokenize_docs.run(make_recipe(docs_root, shard_tokens=10_000), docs_root, MODEL, tmp_path, progress=False)
    many = len(list((tmp_path / "web").glob("train-*.bin")))
    report = tokenize_docs.run(make_recipe(docs_root, shard_tokens=10**9), docs_root, MODEL, tmp_path, progress=False)
    assert report["corpora"]["web"]["status"] == "done"
    assert many > 1 and sorted(p.name for p in (tmp_path / "web").glob("train-*")) == ["train-00000.bin",
                                                                                        "train-00000.idx"]
    assert tokenize_docs.check_manifest(tmp_path / "web")["settings"]["shard_tokens"] == 10**9


def test_bad_records_are_counted_and_skipped(tmp_path):
    good = docs("web", web_texts()[:5])
    bad = [{"id": "a", "corpus": "web", "kind": "doc", "text": ""},
           {"id": "b", "corpus": "web", "kind": "doc"},
           {"id": "c", "corpus": "web", "kind": "conv", "messages": []},
           {"id": "d", "corpus": "web", "kind": "doc", "text": 42}]
    write_parts(good[:2] + bad + good[2:], tmp_path / "docs" / "web")
    report = tokenize_docs.run(make_recipe(tmp_path / "docs"), tmp_path / "docs", MODEL, tmp_path / "out",
                          progress=False)
    assert report["corpora"]["web"]["documents"] == 5 and report["corpora"]["web"]["rejects"] == 4
    m = tokenize_docs.check_manifest(tmp_path / "out" / "web")
    assert m["rejects"] == {"empty text": 1, "text missing or not a string": 2,
                            "kind 'conv' in a pretrain corpus": 1}
    assert {e["id"] for e in m["reject_examples"]} == {"a", "b", "c", "d"}


def test_worker_runs_give_the_documents_and_rejects_the_driver_batches_give(tmp_path):
    # Processes mode and the Ray engine hand workers runs of stored lines (line_runs -> _tokenize_lines); from
    # any resume position, with runs that split parts, they must yield what the driver's own batches yield.
    from tokenizer import Tokenizer
    texts = web_texts()[:12]
    bad = [{"id": "e", "corpus": "web", "kind": "doc", "text": ""}, {"id": "n", "corpus": "web", "kind": "doc"}]
    write_parts(docs("web", texts[:3]) + bad + docs("web", texts[3:]), tmp_path / "web", part_records=5)
    parts = sorted((tmp_path / "web").glob("part-*"))
    assert len(parts) == 3
    tok = Tokenizer.load(MODEL)
    tokenize_docs._init_worker(str(MODEL))
    threshold = int(0.3 * 2 ** 64)

    def flat(results):
        return ([p for b, _, _ in results for p in b.positions], [r for b, _, _ in results for r in b.rejects],
                np.concatenate([b.is_val for b, _, _ in results]).tolist(),
                np.concatenate([b.chars for b, _, _ in results]).tolist(),
                np.concatenate([f for _, f, _ in results]).tolist(), np.concatenate([n for _, _, n in results]).tolist())

    for start in [(0, 0), (0, 2), (1, 3), (2, 0)]:
        driver = [(b, *tokenize_docs.encode_documents(tok, "doc", b.payloads, "uint16", 1))
                  for b in tokenize_docs.iter_batches(parts, "doc", threshold, start)]
        runs = list(tokenize_docs.line_runs(parts, start, run_bytes=2_000))
        assert len(runs) > len(parts) - start[0]       # some runs split a part
        workers = [tokenize_docs._tokenize_lines(("doc", path, part_i, first, lines, threshold, "uint16"))
                   for part_i, first, path, lines in runs]
        assert all(b.payloads == [] for b, _, _ in workers)   # no text travels back
        assert flat(workers) == flat(driver), start
    _, rejects, *_ = flat([tokenize_docs._tokenize_lines(("doc", path, i, first, lines, threshold, "uint16"))
                           for i, first, path, lines in tokenize_docs.line_runs(parts, (0, 0), 2_000)])
    assert [(pos, rid) for pos, _, rid in rejects] == [((0, 4), "e"), ((0, 5), "n")]


def test_a_run_line_that_is_not_json_names_its_part_and_record():
    tokenize_docs._init_worker(str(MODEL))
    with pytest.raises(RecordsError, match=r"part-00007.jsonl.zst, record 3: not a JSON record"):
        tokenize_docs._tokenize_lines(("doc", "part-00007.jsonl.zst", 7, 1, [b'{"text": "a"}\n', b'{"te'],
                                       0, "uint16"))


def test_empty_corpus_gets_a_manifest_without_shards(tmp_path):
    (tmp_path / "docs" / "med").mkdir(parents=True)   # read step ran, kept nothing
    report = tokenize_docs.run(make_recipe(tmp_path / "docs"), tmp_path / "docs", MODEL, tmp_path / "out",
                          progress=False)
    assert report["corpora"]["med"]["status"] == "done" and report["corpora"]["web"]["status"] == "no input"
    m = tokenize_docs.check_manifest(tmp_path / "out" / "med")
    assert m["splits"]["train"] == {"shards": [], "documents": 0, "tokens": 0, "chars": 0}
    assert tokenize_docs.shard_prefixes(tmp_path / "out" / "med") == []
    with pytest.raises(tokenize_docs.ManifestError):
        tokenize_docs.check_manifest(tmp_path / "out" / "web")


def test_malformed_conversations_are_counted_and_skipped(tmp_path):
    good = sft_conversations()[:3]
    bad = [{"id": "x", "corpus": "med_sft", "kind": "conv",
            "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]},
           {"id": "y", "corpus": "med_sft", "kind": "conv", "messages": [{"role": "bot", "content": "a"}]},
           {"id": "z", "corpus": "med_sft", "kind": "doc", "text": "not a conversation"}]
    write_parts(good + bad, tmp_path / "docs" / "med_sft")
    report = tokenize_docs.run(make_recipe(tmp_path / "docs"), tmp_path / "docs", MODEL, tmp_path / "out",
                          progress=False)
    assert report["corpora"]["sft_medical"]["documents"] == 3 and report["corpora"]["sft_medical"]["rejects"] == 3


def test_check_manifest_refuses_other_tokenizer_and_broken_shards(reference, tmp_path):
    out, _ = reference
    m = tokenize_docs.check_manifest(out / "med", tokenize_docs.load_manifest(out / "med")["tokenizer_sha256"])
    assert tokenize_docs.shard_prefixes(out / "med", "val") == [out / "med" / n for n in m["splits"]["val"]["shards"]]
    with pytest.raises(tokenize_docs.ManifestError, match="made with tokenizer"):
        tokenize_docs.check_manifest(out / "med", "0" * 64)
    with pytest.raises(tokenize_docs.ManifestError, match="missing"):
        tokenize_docs.check_manifest(tmp_path)
    import shutil
    shutil.copytree(out / "med", tmp_path / "med")
    bin_file = tmp_path / "med" / "train-00000.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-2])
    with pytest.raises(tokenize_docs.ManifestError, match="inconsistent"):
        tokenize_docs.check_manifest(tmp_path / "med")


def test_int32_is_an_explicit_choice(docs_root, tmp_path):
    tokenize_docs.run(make_recipe(docs_root), docs_root, MODEL, tmp_path, dtype="int32", progress=False)
    m = tokenize_docs.check_manifest(tmp_path / "med")
    assert m["dtype"] == "int32"
    assert IndexedDataset(tmp_path / "med" / "train-00000").tokens.dtype == np.int32


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import data_process.shards as shards
from data_process import tokenize_docs
from data_process.recipe import parse_recipe
closed = [0]
original = shards.ShardWriter.close
def close(self):
    info = original(self)
    closed[0] += 1
    if closed[0] == {stop_after}:   # the train shard and val shard of a checkpoint are closed...
        shards.ShardWriter.add_batch = slow_add   # ...and the next shard is half-written when we die
    return info
def slow_add(self, flat, lengths):
    shards.ShardWriter._write(self, shards._as_tokens(flat, self.dtype))
    print("half-written", flush=True)
    time.sleep(60)
shards.ShardWriter.close = close
raw = {{"tokenize": {{"val_fraction": 0.1, "shard_tokens": 20000, "sft_as_pretrain": []}},
       "corpus": [{{"name": "web", "reader": "jsonl", "paths": ["x"]}}]}}
recipe = parse_recipe(raw, Path({docs!r}))
tokenize_docs.run(recipe, Path({docs!r}), Path({model!r}), Path({out!r}), workers=2, progress=False)
"""


def test_killed_run_resumes_without_redoing_finished_shards(docs_root, reference, tmp_path):
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(root=str(ROOT), docs=str(docs_root), model=str(MODEL), out=str(out), stop_after=4)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half-written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    web = out / "web"
    assert not (web / "manifest.json").exists()
    progress = json.loads((web / "progress.json").read_text())
    finished = progress["splits"]["train"]["shards"] + progress["splits"]["val"]["shards"]
    assert finished == ["train-00000", "train-00001", "val-00000", "val-00001"]
    assert list(web.glob(".train-*.tmp-*")), "the shard being written when killed exists only as a temp file"
    assert not (web / "train-00002.idx").exists() and not is_complete(web / "train-00002")
    stamp = {n: (web / f"{n}.bin").stat().st_mtime_ns for n in finished}

    report = tokenize_docs.run(make_recipe(docs_root), docs_root, MODEL, out, progress=False)
    assert report["corpora"]["web"]["status"] == "resumed"
    assert stamp == {n: (web / f"{n}.bin").stat().st_mtime_ns for n in finished}
    assert not list(web.glob(".*tmp*"))
    ref_out, _ = reference
    assert all_output_bytes(web) == all_output_bytes(ref_out / "web")


def test_small_corpus_always_gets_one_val_document(tmp_path):
    texts = medical_texts()[:12]   # 12 docs at val_fraction 0.01: most likely none would fall under 1%
    hashes = [xxhash.xxh3_64_intdigest(t.encode()) for t in texts]
    assert min(hashes) >= 0.01 * 2 ** 64
    write_parts(docs("med", texts), tmp_path / "docs" / "med")
    write_parts(docs("web", web_texts()[:1]), tmp_path / "docs" / "web")
    tokenize_docs.run(make_recipe(tmp_path / "docs", val_fraction=0.01), tmp_path / "docs", MODEL, tmp_path / "out",
                 progress=False)
    sp = raw_sentencepiece()
    val = [sp.decode(ids[:-1].tolist()) for ids in read_split(tmp_path / "out" / "med", "val")]
    assert val == [texts[hashes.index(min(hashes))]]
    assert len(read_split(tmp_path / "out" / "med", "train")) == 11
    web = tokenize_docs.check_manifest(tmp_path / "out" / "web")   # a single document stays in train
    assert web["splits"]["val"]["documents"] == 0 and web["splits"]["train"]["documents"] == 1


def test_text_that_is_not_valid_unicode_is_a_counted_reject(monkeypatch):
    # orjson never loads a lone surrogate, but a record handed over by other code might hold one: it is
    # rejected with its reason instead of crashing the encoder.
    records = [{"id": "a", "kind": "doc", "text": "好"}, {"id": "b", "kind": "doc", "text": "坏\ud800"},
               {"id": "c", "kind": "conv", "messages": [{"role": "user", "content": "\udfff"}]}]
    monkeypatch.setattr(tokenize_docs, "iter_records", lambda part: iter(records))
    (batch,) = tokenize_docs.iter_batches(["part"], "doc", threshold=0)
    assert batch.payloads == ["好".encode()] and batch.chars.tolist() == [1]
    assert [(pos, reason, rid) for pos, reason, rid in batch.rejects] == [
        ((0, 2), "text is not valid Unicode", "b"), ((0, 3), "kind 'conv' in a pretrain corpus", "c")]
    (batch,) = tokenize_docs.iter_batches(["part"], "conv", threshold=0)
    assert [reason for _, reason, _ in batch.rejects] == ["kind 'doc' where a conversation was expected"] * 2 + [
        "messages are not valid Unicode"]
