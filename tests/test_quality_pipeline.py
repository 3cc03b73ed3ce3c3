"""The read step with every quality operator on: kept + rejected = read per corpus, drops counted by reason,
bounded audit samples written, and bad input (empty text, a 50 MB record, invalid characters) counted."""
import json

import orjson
import pytest
import zstandard

from data_process import pipeline
from data_process.recipe import parse_recipe

ALL_ON = {"t2s": True, "langid": True, "rules": True, "pii": True, "audit_samples": 3}


def bad_input_file(path):
    lines = [
        orjson.dumps({"text": ""}),
        orjson.dumps({"text": "中" * ((50 << 20) // 3)}),                       # a 50 MB record
        b'{"text": "\\ud800 lone surrogate"}',                               # invalid: orjson refuses it
        b'{"text": "\xff\xfe not utf-8"}',
        orjson.dumps({"text": "正文\x00\x07含有控制字符，\u200b零宽字符和\ufeffBOM，但内容本身是一段正常的中文句子。"}),
        orjson.dumps({"text": "高血圧は自覚症状がほとんどないため、定期的に血圧を測ることが大切です。塩分を控えましょう。"}),
        orjson.dumps({"text": "醫院門診時間為每週一至週五，請患者提前預約掛號，聯繫電話13812345678。"}),
        orjson.dumps({"text": "\n".join(["欢迎访问本站，最新优惠活动火热进行中！"] * 6 + ["正文内容到此结束，感谢阅读本文。"])}),
        b"not json at all",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


@pytest.mark.slow
def test_every_operator_on_real_samples_and_bad_input_keeps_the_accounts(samples, tmp_path):
    n_bad = bad_input_file(tmp_path / "bad.jsonl")
    raw = {
        "run": {"data_dir": str(tmp_path / "data")},
        "clean": ALL_ON,
        "corpus": [
            {"name": "web", "reader": "text_jsonl", "paths": [str(samples / "skywork-zh-web/zh_general.jsonl"),
                                                              str(samples / "firefly/dummy_pretrain.jsonl")]},
            {"name": "bad", "reader": "text_jsonl", "paths": [str(tmp_path / "bad.jsonl")]},
            {"name": "dialogue", "reader": "medical_dialogue_csv", "role": "sft", "stage": "medical_dialogue",
             "paths": [str(samples / "toyhom-medical-dialogue/*.csv")]},
            {"name": "sft", "reader": "qa_parquet", "role": "sft", "stage": "general",
             "paths": [str(samples / "chatlm-qa-parquet/*.parquet")]},
            {"name": "c4_en", "reader": "text_jsonl", "lang": "en",
             "paths": [str(samples / "llamafactory-demo/c4_demo.jsonl")]},
        ],
    }
    recipe = parse_recipe(raw, tmp_path)
    result = pipeline.read_step(recipe, workers=1, progress=False)
    for name, c in result["corpora"].items():
        assert c["kept"] + c["rejected"] == c["read"], name
        assert c["rejected"] == sum(c["rejected_by_reason"].values())

    bad = result["corpora"]["bad"]
    assert bad["read"] == n_bad
    reasons = bad["rejected_by_reason"]
    assert reasons["too_long"] == 1 and reasons["lang_mismatch"] == 1 and reasons["rule_dup_line_frac"] == 1
    assert bad["kept"] == 2                                     # the control-character text and the traditional one
    kept = [orjson.loads(line) for part in sorted((tmp_path / "data/clean/bad").glob("part-*.jsonl.zst"))
            for line in zstandard.decompress(part.read_bytes(), max_output_size=1 << 30).splitlines()]
    texts = [r["text"] for r in kept]
    assert "医院门诊时间为每周一至周五，请患者提前预约挂号，联系电话<PHONE>。" in texts    # t2s, then PII
    # t2s runs before langid: the Japanese page's kanji (測, 圧...) were converted too, then it was dropped
    assert bad["clean"]["t2s_converted"] == 2 and bad["clean"]["pii_phone"] == 1

    web = result["corpora"]["web"]
    assert web["kept"] >= 0.85 * web["read"]
    assert all(r.startswith(("rule_", "lang_", "too_", "low_")) for r in web["rejected_by_reason"])
    dialogue = result["corpora"]["dialogue"]
    assert dialogue["kept"] > 7000
    assert result["corpora"]["sft"]["clean"].get("pii_email", 0) >= 5
    assert result["corpora"]["c4_en"]["kept"] >= 0.95 * result["corpora"]["c4_en"]["read"]

    for name in result["corpora"]:
        audit = [json.loads(line) for line in (tmp_path / "data/audit" / f"{name}.jsonl").read_text().splitlines()]
        per_op = {}
        for a in audit:
            per_op[a["op"]] = per_op.get(a["op"], 0) + 1
        assert all(n <= 3 for n in per_op.values()), (name, per_op)
    sft_audit = (tmp_path / "data/audit/sft.jsonl").read_text()
    assert '"op":"pii"' in sft_audit and "<EMAIL>" in sft_audit
