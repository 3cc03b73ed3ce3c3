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
                    "sharegpt": {"no_answer": 1}, "medical_qa_rl": {"missing_field": 1}}


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
    want_kind = {"pretrain": "doc", "sft": "conv", "dpo": "pref", "rl": "conv"}[spec.role]
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
    "sharegpt_pref_msg": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                          "rejected": {"from": "gpt", "value": "b"}},
    "moss_firefly_jsonl": {"conversation_id": 1, "category": "Brainstorming", "dataset": "moss",
                           "conversation": [{"human": "问", "assistant": "答"}]},
}
MISSING = {"sharegpt_pref_msg": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
           "moss_firefly_jsonl": {"conversation_id": 1, "category": "x"},
           "text_jsonl": {"url": "x"}, "baidubaike_jsonl": {}, "guidelines_jsonl": {"id": "1"},
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
              "openai_tools_jsonl": {"messages": "hi"},
              "sharegpt_pref_msg": {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"},
              "moss_firefly_jsonl": {"conversation": "hi"}}


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
                                    "plain_text", "pref_messages_jsonl", "medical_dialogue_txt"])
@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_compressed_file_is_a_counted_reject(tmp_path, samples, reader, codec):
    if reader == "medical_dialogue_csv":
        data = (samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv").read_bytes()[:400_000]
    elif reader == "wiki_json_array":
        data = json.dumps([{"completion": f"条目{i}" * 40} for i in range(2000)], ensure_ascii=False).encode()
    elif reader == "plain_text":
        data = (samples / "medicalgpt/pretrain/fever.txt").read_bytes()
    elif reader == "medical_dialogue_txt":
        data = toyhom_txt_from_csv(samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv")[0].encode("gb18030")
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
    tested = set(JSONL_GOOD) | {"medical_dialogue_csv", "magpie_parquet", "qa_parquet", "plain_text",
                                "medical_dialogue_txt"}
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


# ---------------------------------------------------------------- byte-order marks (issue 14.1)

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name,pack", [("a.jsonl", bytes), ("a.jsonl.gz", gzip.compress),
                                       ("a.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_bom_at_the_start_of_a_jsonl_file_keeps_its_first_record(tmp_path, samples, name, pack):
    src = samples / "medicalgpt/reward/dpo_zh_500.jsonl"
    (tmp_path / name).write_bytes(pack(BOM + src.read_bytes()))
    plain, _ = read_all("sharegpt_pref_jsonl", src, "x")
    records, rejects = read_all("sharegpt_pref_jsonl", tmp_path / name, "x")
    assert not rejects and len(records) == 500 and records == plain


@pytest.mark.parametrize("name,pack", [("w.json", bytes), ("w.json.gz", gzip.compress)])
def test_bom_at_the_start_of_a_json_array_keeps_the_whole_array(tmp_path, name, pack):
    items = [{"completion": f"第{i}条", "source": "wikipedia.zh2307"} for i in range(50)]
    (tmp_path / name).write_bytes(pack(BOM + json.dumps(items, ensure_ascii=False, indent=2).encode()))
    records, rejects = read_all("wiki_json_array", tmp_path / name)
    assert not rejects and [r["text"] for r in records] == [o["completion"] for o in items]


def test_bom_in_byte_range_spans_only_at_byte_zero(tmp_path, samples):
    path = tmp_path / "a.jsonl"
    path.write_bytes(BOM + (samples / "skywork-zh-web/alpaca_data_zh_51k_sample_1k.jsonl").read_bytes())
    whole, rejects = read_all("instruction_json", path, "a.jsonl")
    assert not rejects and len(whole) == 1000
    spans = line_spans(path, 100_000)
    assert len(spans) > 2 and spans[0][0] == 0
    pieces = [r for span in spans for r in read_all("instruction_json", path, "a.jsonl", span)[0]]
    assert pieces == whole
    book = tmp_path / "b.txt"
    book.write_bytes(BOM + (samples / "medicalgpt/pretrain/fever.txt").read_bytes())
    plain, _ = read_all("plain_text", samples / "medicalgpt/pretrain/fever.txt", "b.txt")
    assert read_all("plain_text", book, "b.txt") == (plain, [])
    spans = line_spans(book, 50_000)
    pieces = [r for span in spans for r in read_all("plain_text", book, "b.txt", span)[0]]
    # spans group lines into documents at their own cuts, so compare the lines
    assert [line for r in pieces for line in r["text"].split("\n")] == \
        [line for r in plain for line in r["text"].split("\n")]


def test_bom_at_the_start_of_a_csv_or_text_file(tmp_path, samples):
    csv_text = (samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv").read_bytes().decode("gb18030")
    want, _ = read_all("medical_dialogue_csv", samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv", "t.csv")
    # a UTF-8 re-export with Excel's BOM (the mark says UTF-8, whatever the reader's GB18030 default)
    (tmp_path / "t.csv").write_bytes(BOM + csv_text.encode("utf-8"))
    records, rejects = read_all("medical_dialogue_csv", tmp_path / "t.csv")
    assert not rejects and records == want
    # GB18030's own BOM (U+FEFF encoded, 84 31 95 33)
    (tmp_path / "t.csv").write_bytes(("\ufeff" + csv_text).encode("gb18030"))
    assert read_all("medical_dialogue_csv", tmp_path / "t.csv") == (want, [])
    (tmp_path / "b.txt").write_bytes(BOM + "第一段。\n第二段。\n".encode())
    records, rejects = read_all("plain_text", tmp_path / "b.txt")
    assert [r["text"] for r in records] == ["第一段。\n第二段。"] and not rejects


# ---------------------------------------------------------------- wrong types (issue 14.3)

NUMBER_WHERE_TEXT = {
    "text_jsonl": {"text": 12345},
    "wiki_json_array": {"completion": 12345, "source": "s"},
    "baidubaike_jsonl": {"title": "词条", "summary": 12345, "sections": []},
    "wudao_json_array": {"title": "t", "content": 12345},
    "guidelines_jsonl": {"title": "t", "clean_text": 1.5},
    "minimind_pretrain_jsonl": {"text": 12345},
    "instruction_json": {"instruction": "问", "input": "", "output": 12345},
    "sharegpt_jsonl": {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": 12345}]},
    "minimind_sft_jsonl": {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": 7}]},
    "qa_jsonl": {"问": "问题", "答": 12345},
    "medical_reward_jsonl": {"question": "q", "response_chosen": 12345, "response_rejected": "b"},
    "pref_messages_jsonl": {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 1.0}],
                            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    "sharegpt_pref_jsonl": {"conversations": [{"from": "human", "value": "q"}], "chosen": 12345, "rejected": "b"},
    "sharegpt_pref_msg": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": 1},
                          "rejected": {"from": "gpt", "value": "b"}},
    "moss_firefly_jsonl": {"conversation": [{"human": "问", "assistant": 12345}]},
}


@pytest.mark.parametrize("reader", sorted(NUMBER_WHERE_TEXT))
@pytest.mark.parametrize("odd", [12345, 1.5, True, ["x"], {"x": "y"}])
def test_a_number_bool_list_or_dict_where_text_belongs_is_wrong_type(tmp_path, reader, odd):
    record = json.loads(json.dumps(NUMBER_WHERE_TEXT[reader]))
    text = json.dumps(record)
    for number in ("12345", "1.5", " 7}", " 1}", "1.0"):
        text = text.replace(number, json.dumps(odd) + ("}" if number.endswith("}") else ""), 1) if number in text else text
    path = tmp_path / "n.jsonl"
    path.write_text(text + "\n" + json.dumps(JSONL_GOOD[reader], ensure_ascii=False) + "\n")
    records, rejects = read_all(reader, path)
    assert [(x.where, x.reason) for x in rejects] == [({"line": 1}, "wrong_type")], (text, rejects)
    assert len(records) == (2 if reader == "minimind_pretrain_jsonl" else 1)


def test_wrong_types_in_parquet_columns_and_baidubaike_sections(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"prompt": ["问题一", "问题二"], "response": pa.array([1, 2], pa.int64())}), path)
    records, rejects = read_all("qa_parquet", path)
    assert not records and [x.reason for x in rejects] == ["wrong_type", "wrong_type"]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps({"title": "词条", "summary": "摘要", "sections": v}) for v in (0, "", False, None)))
    records, rejects = read_all("baidubaike_jsonl", path)
    assert [x.where["line"] for x in rejects if x.reason == "wrong_type"] == [1, 2, 3]
    assert [r["text"] for r in records] == ["词条\n摘要"]        # null sections: the entry without sections


# ---------------------------------------------------------------- epfl guidelines (issue 14.2)

def test_guidelines_empty_clean_text_is_an_empty_record_never_raw_text(tmp_path):
    rows = [{"id": "a", "source": "who", "title": "T", "clean_text": "", "raw_text": "<p>raw</p>", "url": "u"},
            {"id": "b", "source": "who", "title": "T", "clean_text": "  \n ", "raw_text": "<p>raw</p>"},
            {"id": "c", "source": "who", "title": "T", "raw_text": "<p>raw</p>"},
            {"id": "d", "source": "who", "title": "T", "clean_text": "Wash hands.", "raw_text": "<p>Wash hands.</p>"}]
    path = tmp_path / "open_guidelines.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records, rejects = read_all("guidelines_jsonl", path)
    assert [r["text"] for r in records] == ["Wash hands."] and records[0]["title"] == "T"
    assert [(x.where["line"], x.reason) for x in rejects] == [(1, "empty"), (2, "empty"), (3, "missing_field")]


# ---------------------------------------------------------------- layouts users bring (issue 14.4)

# LLaMA-Factory data/dpo_zh_demo.json (hiyouga/LLaMA-Factory): a pretty-printed JSON array, ShareGPT "ranking" layout
DPO_ZH_DEMO = [
    {"conversations": [{"from": "human", "value": "请提供一下对香港银行业的分析以及目前面临的挑战。"}],
     "chosen": {"from": "gpt", "value": "香港银行业长期以来一直是该城市金融服务业和整体经济的重要组成部分。"},
     "rejected": {"from": "gpt", "value": "香港的银行业面临着诸多挑战，如低利率、高房价和经济疲软。"}},
    {"conversations": [{"from": "system", "value": "你是一个非常聪明的AI助手，非常擅长按照指示行事。尽你所能地帮助。"},
                       {"from": "human", "value": "请阅读以下文章并选择最佳答案。"}],
     "chosen": {"from": "gpt", "value": "每个房间里的展品都共享相同的主题。"},
     "rejected": {"from": "gpt", "value": "每个房间里的所有展品都属于同一个社会阶层。"}},
    {"conversations": [{"from": "human", "value": "构建一个逻辑推理链。"}, {"from": "gpt", "value": "好的。"},
                       {"from": "human", "value": "再举一个例子。"}],
     "chosen": {"from": "gpt", "value": "前提1：所有哺乳动物都有脊椎。"},
     "rejected": {"from": "gpt", "value": "逻辑推理链是一系列陈述。"}},
]


def test_llamafactory_dpo_zh_demo_layout(tmp_path):
    path = tmp_path / "dpo_zh_demo.json"
    path.write_text(json.dumps(DPO_ZH_DEMO, ensure_ascii=False, indent=2), encoding="utf-8")
    records, rejects = read_all("sharegpt_pref_msg", path)
    assert not rejects and len(records) == 3
    for r, o in zip(records, DPO_ZH_DEMO):
        check_record(r)
        assert r["chosen"] == o["chosen"]["value"] and r["rejected"] == o["rejected"]["value"]
        assert [m["content"] for m in r["prompt"]] == [m["value"] for m in o["conversations"]]
    assert records[1]["prompt"][0]["role"] == "system" and records[2]["prompt"][1]["role"] == "assistant"
    bad = [{**DPO_ZH_DEMO[0], "chosen": {"from": "human", "value": "x"}},      # chosen must be the assistant's
           {**DPO_ZH_DEMO[0], "chosen": [DPO_ZH_DEMO[0]["chosen"]]}]          # a list is another layout
    path.write_text(json.dumps(bad, ensure_ascii=False))
    assert reasons(read_all("sharegpt_pref_msg", path)[1]) == {"bad_roles": 1, "wrong_type": 1}


# Firefly data/dummy_data.jsonl (yangjianxin1/Firefly), MOSS-003-sft's layout
FIREFLY_SFT = [
    {"conversation_id": 1, "category": "Brainstorming", "dataset": "moss",
     "conversation": [{"human": "如何保障工作中遵循正确的安全准则？", "assistant": "为了保障工作中遵循正确的安全准则，以下是一些建议：\n\n1.了解相关安全规定和标准。"},
                      {"human": "如何应对突发紧急情况？", "assistant": "突发紧急情况可能会在任何时间发生。"}]},
    {"conversation_id": 2, "category": "Brainstorming", "dataset": "moss",
     "conversation": [{"human": "What best practices should I follow when designing a website?",
                       "assistant": "Here are some best practices to follow when designing a website."}]},
    {"conversation_id": 3, "category": "Code", "system": "你是一个编程助手。",
     "conversation": [{"human": "写一个快速排序", "assistant": "def quicksort(a): ..."}]},
]


def test_moss_firefly_conversation_layout(tmp_path):
    path = tmp_path / "dummy_data.jsonl"
    path.write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in FIREFLY_SFT) + "\n", encoding="utf-8")
    records, rejects = read_all("moss_firefly_jsonl", path)
    assert not rejects and len(records) == 3
    for r, o in zip(records, FIREFLY_SFT):
        check_record(r)
        body = [m for m in r["messages"] if m["role"] != "system"]
        assert [m["content"] for m in body] == [x for t in o["conversation"] for x in (t["human"], t["assistant"])]
    assert records[2]["messages"][0] == {"role": "system", "content": "你是一个编程助手。"}
    assert splittable("moss_firefly_jsonl", path)


def toyhom_txt_from_csv(csv_path: Path):
    """Toyhom's own Data_数据/IM_内科/数据处理.py (Toyhom/Chinese-medical-dialogue-data), which wrote 内科.txt from the
    CSV: the first 5000 physical lines split on ',', rows of exactly 4 fields with short ask and answer kept, each
    written as title,ask + newline + answer + three newlines. Returns the text and the (ask line, answer) pairs."""
    asks, answers = [], []
    with open(csv_path, encoding="gb18030") as f:
        for i in range(0, 5000):
            lin = f.readline()[0:-1].split(",")
            if i == 0:
                continue
            if len(lin) == 4:
                if len(lin[1] + "," + lin[2]) < 200 and len(lin[3]) < 200:
                    asks.append(lin[1] + "," + lin[2])
                    answers.append(lin[3])
    return "".join(a + "\n" + b + "\n\n\n" for a, b in zip(asks, answers)), list(zip(asks, answers))


def test_toyhom_department_txt_matches_what_upstream_wrote(tmp_path, samples):
    text, pairs = toyhom_txt_from_csv(samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv")
    assert len(pairs) > 2000
    path = tmp_path / "内科.txt"
    path.write_bytes(text.encode("gb18030"))
    records, rejects = read_all("medical_dialogue_txt", path)
    assert not rejects and len(records) == len(pairs)
    for r, (ask_line, answer) in zip(records, pairs):
        check_record(r)
        title, ask = ask_line.split(",")
        user = ask.strip() if ask.strip().startswith(title.strip()) else f"{title.strip()}\n{ask.strip()}"
        assert r["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": answer.strip()}]
    assert records[0]["id"] == "内科.txt:1" and records[1]["id"] == "内科.txt:5"
    # the same dialogues as the CSV reader gives for those rows
    csv_records, _ = read_all("medical_dialogue_csv", samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv")
    by_text = {json.dumps(r["messages"], ensure_ascii=False) for r in csv_records}
    same = sum(json.dumps(r["messages"], ensure_ascii=False) in by_text for r in records)
    assert same >= 0.95 * len(records)


def test_toyhom_txt_malformations(tmp_path):
    # three blocks as in the upstream 内科.txt, then broken ones
    good = ("高血压患者能吃党参吗？,我有高血压这两天女婿来的时候给我拿了些党参泡水喝，您好高血压可以吃党参吗？\n"
            "高血压病人可以口服党参的。\n\n\n"
            "哪家医院能治胃反流,烧心，打隔，咳嗽低烧，以有4年多\n 建议你用奥美拉唑同时，加用吗丁啉\n\n\n").encode("gb18030")
    blocks = [good,
              "只有一行没有回答\n\n\n".encode("gb18030"),                         # line 9: one line
              "三行,问题\n回答\n多出的一行\n\n\n".encode("gb18030"),               # line 12: three lines
              "乱码,问".encode("gb18030") + b"\xff\xff\n" + "回答\n\n\n".encode("gb18030"),  # line 17: undecodable
              "没有逗号的问题\n回答在这里\n\n\n".encode("gb18030"),                # line 21: no comma: no title
              "最后一块,没有换行\n最后的回答".encode("gb18030")]                   # line 25: no final newline
    path = tmp_path / "内科.txt"
    path.write_bytes(b"".join(blocks))
    records, rejects = read_all("medical_dialogue_txt", path)
    assert [(x.where["line"], x.reason) for x in rejects] == [(9, "bad_block"), (12, "bad_block"), (17, "bad_encoding")]
    assert [r["id"] for r in records] == ["内科.txt:1", "内科.txt:5", "内科.txt:21", "内科.txt:25"]
    assert records[1]["messages"][1]["content"] == "建议你用奥美拉唑同时，加用吗丁啉"
    assert records[1]["messages"][0]["content"] == "哪家医院能治胃反流\n烧心，打隔，咳嗽低烧，以有4年多"
    assert records[2]["messages"][0]["content"] == "没有逗号的问题"
    assert not splittable("medical_dialogue_txt", path)   # blocks span lines: one process reads the file


def test_plain_text_encoding_setting(tmp_path, samples):
    src = samples / "medicalgpt/pretrain/fever.txt"
    path = tmp_path / "fever.txt"
    path.write_bytes(src.read_text(encoding="utf-8").encode("gb18030"))
    want, _ = read_all("plain_text", src, "fever.txt")
    records, rejects = read_all("plain_text", path)          # the default is UTF-8: GB18030 lines are rejects
    assert rejects and {x.reason for x in rejects} == {"bad_utf8"}
    got = list(READERS["plain_text"](path, "fever.txt", None, encoding="gb18030"))
    assert got == want
    from data_process.readers import check_encoding
    assert check_encoding("GBK") == "gbk" and check_encoding("utf-8-sig") == "utf-8"
    for bad in ("utf-16", "no-such-codec"):
        with pytest.raises(ValueError):
            check_encoding(bad)


def test_recipe_encoding_is_checked(tmp_path):
    from data_process.recipe import RecipeError, parse_recipe

    def corpus(**kw):
        return {"corpus": [{"name": "b", "reader": "plain_text", "paths": ["x"], **kw}]}

    assert parse_recipe(corpus(encoding="gb18030"), tmp_path).corpora[0].encoding == "gb18030"
    assert parse_recipe(corpus(), tmp_path).corpora[0].encoding == ""
    for bad, match in ((dict(encoding="utf-16"), "ASCII"), (dict(encoding="latin-9x"), "unknown"),
                       (dict(reader="text_jsonl", encoding="gbk"), "JSON")):
        with pytest.raises(RecipeError, match=match):
            parse_recipe(corpus(**bad), tmp_path)


def test_read_step_passes_the_encoding_and_it_is_part_of_the_fingerprint(tmp_path, samples):
    from data_process.pipeline import read_step
    from data_process.recipe import parse_recipe

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "fever.txt").write_bytes(
        (samples / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").encode("gb18030"))
    raw = {"run": {"data_dir": "data"}, "corpus": [{"name": "books", "reader": "plain_text",
                                                     "paths": ["books/*.txt"], "encoding": "gb18030"}]}
    counts = read_step(parse_recipe(raw, tmp_path), workers=1, progress=False)["corpora"]["books"]
    assert counts["kept"] > 50 and set(counts["rejected_by_reason"]) <= {"too_short"} and not counts["skipped"]
    raw["corpus"][0]["encoding"] = "utf-8"
    counts = read_step(parse_recipe(raw, tmp_path), workers=1, progress=False)["corpora"]["books"]
    assert not counts["skipped"] and counts["rejected_by_reason"].get("bad_utf8", 0) > 100


# ---------------------------------------------------------------- a reader that fits none of a file (issue 14.5)

def test_all_rejected_file_says_what_the_reader_expects_and_which_reader_fits(tmp_path):
    from data_process.readers import explain_all_rejected

    path = tmp_path / "dpo_zh_demo.json"
    path.write_text(json.dumps(DPO_ZH_DEMO, ensure_ascii=False, indent=2), encoding="utf-8")
    records, rejects = read_all("sharegpt_pref_jsonl", path)
    assert not records and reasons(rejects) == {"wrong_type": 3}
    message = explain_all_rejected("sharegpt_pref_jsonl", path, "dpo_zh_demo.json", dict(reasons(rejects)), rejects[0])
    assert "'chosen' is a message dict {from, value}" in message
    assert message.endswith("use reader sharegpt_pref_msg")
    assert "sharegpt_pref_jsonl expects MedicalGPT dpo_zh_500" in message
    book = tmp_path / "book.jsonl"
    book.write_text("第一段。\n第二段。\n", encoding="utf-8")
    records, rejects = read_all("text_jsonl", book)
    message = explain_all_rejected("text_jsonl", book, "book.jsonl", dict(reasons(rejects)), rejects[0])
    assert "no JSON records" in message and "plain_text" in message
    for reader, name, data, hint in (
            ("plain_text", "g.txt", "第一段。\n第二段。\n".encode("gb18030") * 20, "set encoding = 'gb18030'"),
            ("text_jsonl", "g.jsonl", json.dumps({"text": "正文内容"}, ensure_ascii=False).encode("gb18030") + b"\n",
             "JSON must be UTF-8")):
        (tmp_path / name).write_bytes(data)
        records, rejects = read_all(reader, tmp_path / name)
        assert not records and rejects
        assert hint in explain_all_rejected(reader, tmp_path / name, name, dict(reasons(rejects)), rejects[0])
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"foo": "bar"}) + "\n")
    rejects = read_all("text_jsonl", odd)[1]
    assert "no reader reads them" in explain_all_rejected("text_jsonl", odd, "odd.jsonl", {"missing_field": 1}, rejects[0])


def test_read_step_warns_about_a_file_the_reader_rejects_whole(tmp_path):
    from data_process.pipeline import format_read_table, read_step
    from data_process.recipe import parse_recipe

    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "dpo_zh_demo.json").write_text(json.dumps(DPO_ZH_DEMO, ensure_ascii=False, indent=2))
    (tmp_path / "dpo" / "ok.jsonl").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": "问题"}], "chosen": "好的回答", "rejected": "坏的回答"},
        ensure_ascii=False) + "\n")
    recipe = parse_recipe({"run": {"data_dir": "data"}, "corpus": [
        {"name": "dpo", "reader": "sharegpt_pref_jsonl", "paths": ["dpo/*"], "role": "dpo", "lang": "mixed",
         "clean": {"min_chars": 1}}]}, tmp_path)
    result = read_step(recipe, workers=1, progress=False)
    counts = result["corpora"]["dpo"]
    assert (counts["read"], counts["kept"]) == (4, 1)
    [warning] = counts["warnings"]
    assert warning.startswith("dpo/dpo_zh_demo.json: reader 'sharegpt_pref_jsonl' rejected every record (3: wrong_type 3)")
    assert "use reader sharegpt_pref_msg" in warning
    assert f"warning: dpo: {warning}" in format_read_table(result)


# ---------------------------------------------------------------- conversations keep their valid prefix (issue 14.6)

def test_read_step_keeps_the_pairs_before_a_zero_width_reply_and_counts_the_cut(tmp_path, samples):
    from data_process.pipeline import read_step
    from data_process.records import iter_records
    from data_process.recipe import parse_recipe

    real = [json.loads(x) for x in (samples / "medicalgpt/sft/medical_sft_1K_format.jsonl").read_text().splitlines()]
    turns = [t for o in real[:14] for t in o["conversations"][:2]]              # 28 turns of real dialogue
    assert len(turns) == 28 and [t["from"] for t in turns[:2]] == ["human", "gpt"]
    broken = [dict(t) for t in turns]
    broken[9]["value"] = "\u200b"                                               # the 5th reply: a zero-width space
    (tmp_path / "sg").mkdir()
    (tmp_path / "sg" / "a.jsonl").write_text("\n".join(json.dumps({"conversations": c}, ensure_ascii=False)
                                                       for c in (broken, turns)) + "\n", encoding="utf-8")
    recipe = parse_recipe({"run": {"data_dir": "data"}, "corpus": [
        {"name": "sg", "reader": "sharegpt_jsonl", "paths": ["sg/*.jsonl"], "role": "sft", "stage": "general"}]},
        tmp_path)
    counts = read_step(recipe, workers=1, progress=False)["corpora"]["sg"]
    assert (counts["read"], counts["kept"]) == (2, 2)
    assert counts["clean"]["convs_truncated_empty_turn"] == 1 and counts["clean"]["turns_cut_empty_turn"] == 20
    first, second = iter_records(tmp_path / "data" / "clean" / "sg")
    assert [m["content"] for m in first["messages"]] == [t["value"].strip() for t in turns[:8]]
    assert len(second["messages"]) == 28


def test_toyhom_readers_read_a_utf8_reexport_without_mojibake(tmp_path, samples):
    """Decoding UTF-8 Chinese as GB18030 does not always fail (some lines come out as other characters), so the
    Toyhom readers' default is GB18030 unless the file is valid UTF-8; an explicit encoding is obeyed."""
    src = samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv"
    want, _ = read_all("medical_dialogue_csv", src, "t.csv")
    (tmp_path / "t.csv").write_bytes(src.read_bytes().decode("gb18030").encode("utf-8"))
    assert read_all("medical_dialogue_csv", tmp_path / "t.csv") == (want, [])
    text, _ = toyhom_txt_from_csv(src)
    (tmp_path / "g.txt").write_bytes(text.encode("gb18030"))
    (tmp_path / "u.txt").write_bytes(text.encode("utf-8"))
    assert read_all("medical_dialogue_txt", tmp_path / "u.txt", "x") == read_all("medical_dialogue_txt", tmp_path / "g.txt", "x")
    forced = list(READERS["medical_dialogue_txt"](tmp_path / "u.txt", "x", None, encoding="gb18030"))
    assert forced != read_all("medical_dialogue_txt", tmp_path / "u.txt", "x")[0]


def test_a_turn_that_breaks_the_alternation_keeps_the_pairs_before_it_and_is_counted(tmp_path):
    from data_process.pipeline import read_step
    from data_process.recipe import parse_recipe

    def turns(*roles):
        return [{"from": r, "value": f"第{i}轮的内容，足够长的一句话。"} for i, r in enumerate(roles)]

    convs = [turns("human", "gpt", "human", "gpt", "gpt", "human", "gpt"),    # a doubled reply at turn 4
             turns("human", "gpt", "human"),                                   # no answer to the last question
             turns("gpt", "human", "gpt"),                                     # starts with the assistant
             turns("human", "human")]                                          # no answer at all
    (tmp_path / "sg").mkdir()
    (tmp_path / "sg" / "a.jsonl").write_text("\n".join(json.dumps({"conversations": c}, ensure_ascii=False)
                                                       for c in convs) + "\n")
    records, rejects = read_all("sharegpt_jsonl", tmp_path / "sg" / "a.jsonl")
    assert [len(r["messages"]) for r in records] == [4, 2]
    assert [r["cut"] for r in records] == [{"bad_roles": 3}, {"trailing_user": 1}]
    assert [(x.where["line"], x.reason) for x in rejects] == [(3, "bad_roles"), (4, "no_answer")]
    recipe = parse_recipe({"run": {"data_dir": "data"}, "corpus": [
        {"name": "sg", "reader": "sharegpt_jsonl", "paths": ["sg/*.jsonl"], "role": "sft", "stage": "general"}]},
        tmp_path)
    counts = read_step(recipe, workers=1, progress=False)["corpora"]["sg"]
    assert (counts["read"], counts["kept"], counts["rejected"]) == (4, 2, 2)
    assert {k: v for k, v in counts["clean"].items() if "cut" in k or "truncated" in k} == {
        "convs_truncated_bad_roles": 1, "turns_cut_bad_roles": 3,
        "convs_truncated_trailing_user": 1, "turns_cut_trailing_user": 1}
    from data_process.records import iter_records
    assert all("cut" not in r for r in iter_records(tmp_path / "data" / "clean" / "sg"))
