"""Every reader on the embedded samples, on the real upstream samples, and on malformed input."""
import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import ROOT
from data_process.pipeline import line_spans
from data_process.readers import READERS, Reject, splittable
from data_process.recipe import load_recipe, resolve_paths


def read_all(reader, path, src=None, span=None):
    out = list(READERS[reader](Path(path), src or Path(path).name, span))
    records = [x for x in out if not isinstance(x, Reject)]
    rejects = [x for x in out if isinstance(x, Reject)]
    return records, rejects


def check_record(r):
    """The CONTRACTS.md record format (before the pipeline stamps "corpus")."""
    assert isinstance(r["id"], str) and r["id"]
    assert r["kind"] in ("doc", "conv", "pref")
    if r["kind"] == "doc":
        assert isinstance(r["text"], str)
        return
    msgs = r["messages"] if r["kind"] == "conv" else r["prompt"]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    assert body, r
    for i, m in enumerate(body):
        assert set(m) == {"role", "content"} and isinstance(m["content"], str)
        assert m["role"] == ("user" if i % 2 == 0 else "assistant"), r
    if r["kind"] == "conv":
        assert body[-1]["role"] == "assistant"
    else:
        assert body[-1]["role"] == "user"
        assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str)


# ---------------------------------------------------------------- embedded samples (the default recipe)

RECIPE = load_recipe(ROOT / "config" / "recipe.toml", root=ROOT)
# (records, {reason: count}) each embedded corpus must give: pins the deliberate problems in the samples
EXPECTED_REJECTS = {"c4_zh": {"bad_json": 1}, "wudao": {"missing_field": 2}, "medical_finetune": {"missing_field": 1},
                    "sharegpt": {"no_answer": 1}}


@pytest.mark.parametrize("spec", RECIPE.corpora, ids=lambda s: s.name)
def test_every_embedded_corpus_reads_in_its_format(spec):
    files = resolve_paths(RECIPE, spec.paths)
    assert files, f"no embedded sample for {spec.name}"
    kinds = Counter()
    rejects = Counter()
    ids = set()
    for f in files:
        records, rej = read_all(spec.reader, f, f.name)
        for r in records:
            check_record(r)
            kinds[r["kind"]] += 1
            assert r["id"] not in ids
            ids.add(r["id"])
        rejects.update(x.reason for x in rej)
    want_kind = {"pretrain": "doc", "sft": "conv", "dpo": "pref"}[spec.role]
    assert set(kinds) == {want_kind} and kinds[want_kind] >= 5
    assert dict(rejects) == EXPECTED_REJECTS.get(spec.name, {})


def test_embedded_samples_cover_the_upstream_layouts():
    c = ROOT / "corpora"
    assert (c / "wiki_zh/wikipedia-cn-20230720-filtered.json").read_bytes().lstrip()[:1] == b"["
    assert all(p.read_bytes()[:1] == b"[" for p in (c / "wudao").glob("*.json"))
    csv_bytes = (c / "medical_dialogue/内科5000-6000.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        csv_bytes.decode("utf-8")
    with pytest.raises(UnicodeDecodeError):
        csv_bytes.decode("gb2312")  # GBK-only characters, as in the real Toyhom files
    assert '"' in csv_bytes.decode("gb18030")
    assert pq.read_schema(c / "magpie_dpo/train-00000-of-00001.parquet").field("chosen").type.value_type.num_fields == 2
    zstandard.ZstdDecompressor().decompressobj().decompress((c / "skypile/2020-40_zh_head_0000.jsonl.zst").read_bytes())
    gzip.decompress((c / "c4_zh/c4-zh-00000.json.gz").read_bytes())
    assert not (c / "minimind_pretrain/pretrain_hq.jsonl").read_bytes().endswith(b"\n")


def test_baidubaike_keeps_title_and_every_section_when_summary_is_null_or_missing():
    path = ROOT / "corpora/baidubaike/563w_baidubaike.json"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    records, _ = read_all("baidubaike_jsonl", path)
    by_line = {int(r["id"].rsplit(":", 1)[1]): r for r in records}
    seen = set()
    for lineno, entry in enumerate(raw, 1):
        if entry.get("summary") is None and entry["sections"]:
            seen.add("null" if "summary" in entry else "missing")
            r = by_line[lineno]
            assert r["title"] == entry["title"] and r["text"].startswith(entry["title"] + "\n")
            for s in entry["sections"]:
                assert s["title"] in r["text"] and s["content"] in r["text"]
    assert seen == {"null", "missing"}


def test_minimind_pretrain_splits_segments_and_r1_keeps_think_tags():
    records, _ = read_all("minimind_pretrain_jsonl", ROOT / "corpora/minimind_pretrain/pretrain_hq.jsonl")
    assert all("<s>" not in r["text"] and "</s>" not in r["text"] for r in records)
    assert any(r["id"].endswith(".1") for r in records)  # a second segment of a line
    records, _ = read_all("minimind_sft_jsonl", ROOT / "corpora/minimind_r1/r1_mix_1024.jsonl")
    answer = records[0]["messages"][-1]["content"]
    assert answer.startswith("<think>") and "</think>" in answer and answer.rstrip().endswith("</answer>")


# ---------------------------------------------------------------- real upstream samples


def test_toyhom_csv_gives_exactly_7644_conversations(samples):
    records, rejects = read_all("medical_dialogue_csv", samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv")
    assert len(records) == 7644 and rejects == []
    for r in records:
        check_record(r)
    first = records[0]["messages"]
    assert first[0]["content"].startswith("高血压患者能吃党参吗？") and first[1]["content"].startswith("高血压病人可以口服党参的")
    assert any("\n" in r["messages"][1]["content"] for r in records)  # quoted multi-line answers kept whole


def test_firefly_last_line_without_newline_is_kept(samples):
    path = samples / "firefly/dummy_pretrain.jsonl"
    assert not path.read_bytes().endswith(b"\n")
    records, rejects = read_all("text_jsonl", path)
    assert len(records) == 45 and not rejects
    assert records[-1]["text"] == json.loads(path.read_bytes().splitlines()[-1])["text"]
    records, rejects = read_all("pref_messages_jsonl", samples / "firefly/dummy_dpo.jsonl")
    assert len(records) == 16 and not rejects  # 15 newlines, 16 records
    for r in records:
        check_record(r)


@pytest.mark.parametrize("reader,rel,count", [
    ("qa_parquet", "chatlm-qa-parquet/my_train_dataset_3k.parquet", 3000),
    ("qa_jsonl", "medicalgpt/rag/medical_corpus.txt", 87),
    ("sharegpt_pref_jsonl", "medicalgpt/reward/dpo_zh_500.jsonl", 500),
    ("medical_reward_jsonl", "medicalgpt/reward/medical_reward_pairs.jsonl", 100),
    ("sharegpt_jsonl", "medicalgpt/sft/medical_sft_1K_format.jsonl", 1000),
    ("instruction_json", "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl", 1000),
    ("text_jsonl", "skywork-zh-web/zh_general.jsonl", 240),
    ("text_jsonl", "llamafactory-demo/c4_demo.jsonl", 300),
    ("minimind_pretrain_jsonl", "minimind-format-tiny/tiny_pretrain.jsonl", 4),
    ("minimind_sft_jsonl", "minimind-format-tiny/tiny_sft.jsonl", 3),
    ("pref_messages_jsonl", "minimind-format-tiny/tiny_dpo.jsonl", 2),
])
def test_real_samples_read_completely(samples, reader, rel, count):
    records, rejects = read_all(reader, samples / rel)
    assert len(records) == count and not rejects
    for r in records:
        check_record(r)


def test_real_sample_field_semantics(samples):
    rag, _ = read_all("qa_jsonl", samples / "medicalgpt/rag/medical_corpus.txt")
    assert rag[0]["messages"] == [{"role": "user", "content": "肛门病变可能是什么疾病的症状?"},
                                  {"role": "assistant", "content": "食管克罗恩病"}]
    dpo, _ = read_all("sharegpt_pref_jsonl", samples / "medicalgpt/reward/dpo_zh_500.jsonl")
    assert dpo[0]["prompt"][-1]["content"].startswith("20个关于新鲜果汁菜单的口号")
    assert dpo[0]["chosen"].startswith("这里是一个名为“Dishes”的餐厅的20个口号")
    ff, _ = read_all("pref_messages_jsonl", samples / "firefly/dummy_dpo.jsonl")
    raw = json.loads((samples / "firefly/dummy_dpo.jsonl").read_text().splitlines()[0])
    assert ff[0]["prompt"] == [{"role": "user", "content": raw["prompt"]}]
    assert ff[0]["chosen"] == raw["chosen"][-1]["content"] and ff[0]["rejected"] == raw["rejected"][-1]["content"]
    pq_records, _ = read_all("qa_parquet", samples / "chatlm-qa-parquet/my_train_dataset_3k.parquet")
    table = pq.read_table(samples / "chatlm-qa-parquet/my_train_dataset_3k.parquet")
    assert pq_records[5]["messages"][0]["content"] == table.column("prompt")[5].as_py()
    assert pq_records[5]["messages"][1]["content"] == table.column("response")[5].as_py()
    alpaca, _ = read_all("instruction_json", samples / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl")
    with_input = [json.loads(x) for x in (samples / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl").read_text().splitlines()]
    i = next(k for k, o in enumerate(with_input) if o["input"])
    assert alpaca[i]["messages"][0]["content"] == with_input[i]["instruction"] + "\n" + with_input[i]["input"]


def test_plain_text_books_group_lines_and_keep_every_line(samples):
    path = samples / "medicalgpt/pretrain/fever.txt"
    records, rejects = read_all("plain_text", path)
    assert not rejects
    kept_lines = [line for r in records for line in r["text"].split("\n")]
    assert kept_lines == [line.strip() for line in path.read_text().splitlines() if line.strip()]
    assert all(len(r["text"]) < 2000 + 3100 for r in records)


def test_json_array_is_parsed_incrementally_and_matches_json_load(tmp_path):
    items = [{"completion": f"第{i}条：" + "内容" * (i % 50 + 1), "source": "wikipedia.zh2307"} for i in range(3000)]
    path = tmp_path / "wiki.json"
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2))
    records, rejects = read_all("wiki_json_array", path)
    assert not rejects and [r["text"] for r in records] == [o["completion"] for o in items]
    assert records[7]["id"] == "wiki.json:7"


@pytest.mark.parametrize("chunk", [300, 1000, 1777])
def test_byte_range_spans_give_the_same_records_as_the_whole_file(samples, chunk):
    path = samples / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl"
    whole, _ = read_all("instruction_json", path, "a.jsonl")
    assert splittable("instruction_json", path)
    spans = line_spans(path, chunk * 100)
    assert len(spans) > 1
    pieces = [r for span in spans for r in read_all("instruction_json", path, "a.jsonl", span)[0]]
    assert pieces == whole


def test_compressed_inputs_read_like_plain_ones(tmp_path, samples):
    src = samples / "firefly/dummy_pretrain.jsonl"
    plain, _ = read_all("text_jsonl", src, "x")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    # two zstd frames back to back, as `cat a.zst b.zst` makes
    data = src.read_bytes()
    z = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(z.compress(data[:50000]) + z.compress(data[50000:]))
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        records, rejects = read_all("text_jsonl", tmp_path / name, "x")
        assert records == plain and not rejects
        assert not splittable("text_jsonl", tmp_path / name)


# ---------------------------------------------------------------- malformed input: counted rejects, never a crash


def reasons(rejects):
    return Counter(x.reason for x in rejects)


JSONL_GOOD = {
    "text_jsonl": {"text": "正常的一行文本。"},
    "baidubaike_jsonl": {"title": "词条", "summary": "摘要", "sections": [{"title": "a", "content": "b"}]},
    "guidelines_jsonl": {"id": "1", "title": "t", "clean_text": "Some guideline text."},
    "minimind_pretrain_jsonl": {"text": "<s>一段。</s><s>两段。</s>"},
    "instruction_json": {"instruction": "问", "input": "", "output": "答"},
    "sharegpt_jsonl": {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]},
    "minimind_sft_jsonl": {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
    "qa_jsonl": {"问": "问题", "答": "回答"},
    "medical_reward_jsonl": {"question": "q", "response_chosen": "a", "response_rejected": "b"},
    "pref_messages_jsonl": {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    "sharegpt_pref_jsonl": {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"},
    "wiki_json_array": {"completion": "文本", "source": "s"},
    "wudao_json_array": {"id": 1, "title": "t", "content": "正文"},
    "openai_tools_jsonl": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                           "messages": [{"role": "user", "content": "问"}, {"role": "assistant", "tool_calls": [
                               {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                               {"role": "tool", "tool_call_id": "c", "content": "结果"},
                               {"role": "assistant", "content": "答"}]},
}
MISSING = {"text_jsonl": {"url": "x"}, "baidubaike_jsonl": {}, "guidelines_jsonl": {"id": "1"},
           "minimind_pretrain_jsonl": {}, "instruction_json": {"instruction": "q"}, "sharegpt_jsonl": {},
           "minimind_sft_jsonl": {"messages": []}, "qa_jsonl": {"问": "q"}, "medical_reward_jsonl": {"question": "q"},
           "pref_messages_jsonl": {"chosen": []}, "sharegpt_pref_jsonl": {"conversations": []},
           "wiki_json_array": {"source": "s"}, "wudao_json_array": {"title": "t"}, "openai_tools_jsonl": {"tools": []}}
WRONG_TYPE = {"text_jsonl": {"text": ["a"]}, "baidubaike_jsonl": {"title": "t", "sections": "not a list"},
              "guidelines_jsonl": {"clean_text": {"a": 1}}, "minimind_pretrain_jsonl": {"text": None, "x": 1},
              "instruction_json": {"instruction": "q", "output": ["a"]},
              "sharegpt_jsonl": {"conversations": "hi"}, "minimind_sft_jsonl": {"conversations": [["user", "hi"]]},
              "qa_jsonl": {"问": "q", "答": {"x": 1}}, "medical_reward_jsonl": {"question": "q", "response_chosen": [], "response_rejected": "b"},
              "pref_messages_jsonl": {"chosen": "a", "rejected": "b"}, "sharegpt_pref_jsonl": {"conversations": [{"from": "human", "value": "q"}], "chosen": ["a"], "rejected": "b"},
              "wiki_json_array": {"completion": ["x"]}, "wudao_json_array": {"content": {"x": 1}},
              "openai_tools_jsonl": {"messages": "hi"}}


@pytest.mark.parametrize("reader", sorted(JSONL_GOOD))
def test_jsonl_reader_rejects_each_malformation_and_keeps_going(tmp_path, reader):
    good = json.dumps(JSONL_GOOD[reader], ensure_ascii=False).encode()
    lines = [good,
             b'{"text": "unterminated',                                    # 2 bad JSON
             b'{"text": "\xff\xfe bad bytes"}',                            # 3 undecodable bytes
             json.dumps(MISSING[reader]).encode(),                         # 4 missing field
             json.dumps(WRONG_TYPE[reader]).encode(),                      # 5 wrong type
             b"[1, 2, 3]",                                                 # 6 not an object
             b"",                                                          # blank: not a record
             good]                                                         # 8 last line, no newline
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))
    records, rejects = read_all(reader, path)
    n_good = 2 * (2 if reader == "minimind_pretrain_jsonl" else 1)
    assert len(records) == n_good
    where = {x.where["line"]: x.reason for x in rejects}
    assert where[2] == "bad_json" and where[3] == "bad_utf8"
    assert where[4] in ("missing_field", "no_answer", "bad_roles")
    assert where[5] in ("wrong_type", "missing_field")
    assert where[6] == "wrong_type"
    assert set(where) == {2, 3, 4, 5, 6}
    for r in records:
        check_record(r)


@pytest.mark.parametrize("reader", ["text_jsonl", "instruction_json", "wiki_json_array", "medical_dialogue_csv",
                                    "plain_text", "pref_messages_jsonl"])
@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_compressed_file_is_a_counted_reject(tmp_path, samples, reader, codec):
    if reader == "medical_dialogue_csv":
        data = (samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv").read_bytes()[:400_000]
    elif reader == "wiki_json_array":
        data = json.dumps([{"completion": f"条目{i}" * 40} for i in range(2000)], ensure_ascii=False).encode()
    elif reader == "plain_text":
        data = (samples / "medicalgpt/pretrain/fever.txt").read_bytes()
    elif reader == "pref_messages_jsonl":
        data = (samples / "firefly/dummy_dpo.jsonl").read_bytes()
    elif reader == "instruction_json":
        data = (samples / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl").read_bytes()
    else:
        data = (samples / "skywork-zh-web/zh_general.jsonl").read_bytes()
    packed = gzip.compress(data) if codec == "gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"cut.{'csv' if reader.endswith('csv') else 'jsonl'}.{codec}"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    records, rejects = read_all(reader, path)
    assert [x.reason for x in rejects][-1] == "truncated"
    assert len(rejects) <= 2  # the cut may also split one line: at most that line + the truncation


def test_json_array_malformations(tmp_path):
    path = tmp_path / "arr.json"
    path.write_bytes(b'[{"completion": "a"}, 5, {"source": "x"}, {"completion": ["x"]}, {"completion": "b"}]')
    records, rejects = read_all("wiki_json_array", path)
    assert [r["text"] for r in records] == ["a", "b"]
    assert [(x.where, x.reason) for x in rejects] == [({"item": 1}, "wrong_type"), ({"item": 2}, "missing_field"),
                                                     ({"item": 3}, "wrong_type")]
    path.write_bytes(b'[{"completion": "a"}, {"completion": "b\xff"}, {"completion": "c"}]')
    records, rejects = read_all("wiki_json_array", path)
    assert [r["text"] for r in records] == ["a"] and [x.reason for x in rejects] == ["bad_utf8"]
    path.write_bytes(b'[{"completion": "a"}, {"completion": "b"}, {"compl')
    records, rejects = read_all("wiki_json_array", path)
    assert len(records) == 2 and [x.reason for x in rejects] == ["truncated"]
    path.write_bytes(b'[{"completion": "a"}, {"completion": "b"} {"completion": "c"}]')
    records, rejects = read_all("wiki_json_array", path)
    assert len(records) == 2 and [x.reason for x in rejects] == ["bad_json"]
    path.write_bytes(b"   \n")
    assert read_all("wiki_json_array", path) == ([], [])


def test_csv_malformations(tmp_path):
    header = "department,title,ask,answer\n".encode("gb18030")
    ok = "内科,头痛怎么办,最近头痛,注意休息\n".encode("gb18030")
    rows = [ok,
            b"\xe5\x86\x85\xff\xff,t,a,b\n",                                   # undecodable as GB18030
            "内科,只有三列,问\n".encode("gb18030"),                            # wrong field count
            "内科,无回答,问题,\n".encode("gb18030"),                           # empty answer (cleaning drops it)
            '内科,多行,"第一行\n第二行",回答\n'.encode("gb18030"),
            ok.rstrip(b"\n")]                                                  # no final newline
    path = tmp_path / "d.csv"
    path.write_bytes(header + b"".join(rows))
    records, rejects = read_all("medical_dialogue_csv", path)
    assert [(x.where["line"], x.reason) for x in rejects] == [(3, "bad_encoding"), (4, "bad_row")]
    assert len(records) == 4
    assert records[2]["messages"][0]["content"] == "多行\n第一行\n第二行"
    assert records[3]["id"] == "d.csv:8"
    path.write_bytes("科室,问题\n内科,x\n".encode("gb18030"))
    records, rejects = read_all("medical_dialogue_csv", path)
    assert not records and [x.reason for x in rejects] == ["missing_field"]


def test_parquet_malformations(tmp_path):
    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    table = pa.table({"uuid": ["a", "b", "c"], "instruction": ["q", "q", "q"],
                      "chosen": pa.array([[{"content": "q", "role": "user"}, {"content": "good", "role": "assistant"}],
                                          None,
                                          [{"content": "q", "role": "user"}, {"content": "x", "role": "assistant"}]], msg),
                      "rejected": pa.array([[{"content": "q", "role": "user"}, {"content": "bad", "role": "assistant"}],
                                            [{"content": "q", "role": "user"}, {"content": "bad", "role": "assistant"}],
                                            [{"content": "other", "role": "user"}, {"content": "y", "role": "assistant"}]], msg)})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    records, rejects = read_all("magpie_parquet", path)
    assert [r["chosen"] for r in records] == ["good"]
    assert [(x.where, x.reason) for x in rejects] == [({"row": 1}, "missing_field"), ({"row": 2}, "prompt_mismatch")]
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[:-100])
    records, rejects = read_all("magpie_parquet", cut)
    assert not records and [x.reason for x in rejects] == ["bad_parquet"]
    records, rejects = read_all("qa_parquet", path)  # no prompt/response columns at all
    assert not records and {x.reason for x in rejects} == {"missing_field"} and len(rejects) == 3


def test_plain_text_undecodable_line(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes("第一段。\n".encode() + b"\xff\xfe\n" + "第三段。".encode())
    records, rejects = read_all("plain_text", path)
    assert [r["text"] for r in records] == ["第一段。\n第三段。"]
    assert [(x.where, x.reason) for x in rejects] == [({"line": 2}, "bad_utf8")]


def test_every_reader_has_a_malformed_input_test():
    tested = set(JSONL_GOOD) | {"medical_dialogue_csv", "magpie_parquet", "qa_parquet", "plain_text"}
    assert tested == set(READERS)


@pytest.mark.parametrize("reader", sorted(JSONL_GOOD))
def test_randomly_mistyped_fields_never_crash_a_reader(tmp_path, reader):
    import random

    rng = random.Random(reader)
    odd_values = [None, 0, 1.5, True, "", "字", [], [1], ["x"], {}, {"role": "user"}, [{"role": "gpt"}],
                  [{"from": "human", "value": 3}], [{"role": "assistant", "content": None}]]

    def mutate(value, depth=0):
        if rng.random() < 0.3:
            return rng.choice(odd_values)
        if isinstance(value, dict):
            return {k: mutate(v, depth + 1) for k, v in value.items() if rng.random() > 0.1}
        if isinstance(value, list):
            return [mutate(v, depth + 1) for v in value]
        return value

    lines = [json.dumps(mutate(JSONL_GOOD[reader]), ensure_ascii=False) for _ in range(300)]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines))
    records, rejects = read_all(reader, path)
    lines_out = {int(r["id"].split(":")[1].split(".")[0]) for r in records} | {x.where["line"] for x in rejects}
    assert lines_out == set(range(1, 301))  # every line is a record or a reject: nothing silently skipped
    for r in records:
        check_record(r)


@pytest.mark.parametrize("content,is_array", [
    (b'[\n  {"completion": "a"},\n  {"completion": "b"}\n]\n', True),     # pretty-printed (pleisto wiki)
    (b'[{"title": "t", "content": "c"}, {"title": "u", "content": "d"}]', True),  # one line (WuDao)
    (b'\xef\xbb\xbf  [{"a": 1}]\n', True),                                  # BOM and blanks first
    (b'[1, 2]\n{"text": "x"}\n', False),                                    # JSONL whose first line is a list
    (b'{"text": "x"}\n', False),
    (b"", False),
])
def test_json_array_or_jsonl_is_sniffed_from_the_first_line(tmp_path, content, is_array):
    from data_process.readers import sniff_json_array

    path = tmp_path / "f.json"
    path.write_bytes(content)
    assert sniff_json_array(path) is is_array
