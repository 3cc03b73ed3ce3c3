"""Cleaning never corrupts text, normalizes what it should, and counts every drop."""
import json
import re
import unicodedata
from collections import Counter

import pytest

from data_process.clean import NFKC_TABLE, Cleaner, clean_message, clean_text, nfkc_safe, punct_run_regex, zh_ratio
from data_process.recipe import CleanConfig

S = CleanConfig()


def doc_clean(text, settings=S):
    stats = Counter()
    return clean_text(text, settings, stats, punct_run_regex(settings.max_punct_repeat)), stats


def test_blood_pressure_and_mixed_chinese_english_are_untouched():
    # baby-llama2-chinese's cleaner turned this into "blood，presure"
    for text in ["blood pressure", "The patient's blood pressure was 150/95 mmHg, so we started amlodipine 5 mg.",
                 "高血压（hypertension）患者的blood pressure应控制在130/80 mmHg以下，HbA1c < 7%。",
                 "使用 PyTorch 的 torch.nn.functional.softmax(x, dim=-1) 计算概率。",
                 "Mr. Smith, aged 65, e.g. (see Fig. 2): CT showed a 3.5 cm mass... follow-up in 3 months!",
                 "“你好”，他说：“请问去医院怎么走？”——《内科学》第9版、第3章；约100~200例。"]:
        assert doc_clean(text)[0] == text
        assert clean_message(text, S, Counter()) == text


def test_fullwidth_chinese_punctuation_is_kept_but_fullwidth_letters_and_digits_become_ascii():
    out, _ = doc_clean("患者ＣＴ检查１２次，结果正常！（复查）：好；是吗？")
    assert out == "患者CT检查12次，结果正常！（复查）：好；是吗？"


def test_nfkc_keeps_units_superscripts_circled_numbers_and_ellipsis():
    text = "白细胞计数10⁹/L，体表面积1.7 m²，用法：①口服②静脉……温度37℃，Ⅱ型，ﬁnd"
    out = nfkc_safe(text)
    assert "10⁹/L" in out and "m²" in out and "①口服②静脉" in out and "……" in out
    assert "37°C" in out and "II型" in out and "find" in out


def test_the_nfkc_table_is_the_per_character_scan_of_all_of_unicode():
    # the table skips blocks NFKC leaves alone as a whole; it must hold exactly what a scan of every code
    # point finds (an independent computation: unicodedata on each character by itself)
    import sys
    from data_process.clean import _keep_as_is
    scan = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if not 0xD800 <= cp <= 0xDFFF and (norm := unicodedata.normalize("NFKC", ch)) != ch and \
                not _keep_as_is(ch) and unicodedata.combining(ch) == 0:
            scan[ch] = norm
    assert NFKC_TABLE == scan and len(scan) > 4000


def test_nfkc_safe_equals_unicode_nfkc_outside_the_kept_characters():
    # independent reference: unicodedata's NFKC on text that has none of the deliberately kept characters
    kept = {chr(c) for c in range(0x10000) if unicodedata.normalize("NFKC", chr(c)) != chr(c)} - set(NFKC_TABLE)
    sample = "".join(ch for ch in NFKC_TABLE if unicodedata.combining(ch) == 0)  # all ~4,500 of them
    text = "测试" + sample + "abc e\u0301"
    assert not kept & set(text)
    assert nfkc_safe(text) == unicodedata.normalize("NFKC", text)


def test_control_characters_zero_width_and_line_endings():
    out, stats = doc_clean("第一行\x00\x07\u200b\ufeff内容\r\n第二行\r第三行")
    assert out == "第一行内容\n第二行\n第三行"
    assert stats["control_chars_removed"] == 1


def test_whitespace_collapses_in_documents_but_not_in_conversations():
    out, _ = doc_clean("　　段落开头有全角空格，\t中间   有多个空格。  \n\n\n\n\n下一段")
    assert out == "段落开头有全角空格， 中间 有多个空格。\n\n下一段"
    code = "示例代码：\n```python\ndef f(x):\n    return x  # 缩进保留\n```"
    assert clean_message(code + "   \n", S, Counter()) == code


def test_repeated_punctuation_is_shortened_and_counted():
    out, stats = doc_clean("太好了！！！！！！真的吗？？？？？好……好。。。。。。——。")
    assert out == "太好了！！！真的吗？？？好……好。。。——。"
    assert stats["punct_runs_shortened"] == 3
    assert doc_clean("分隔线 ------ 结束 ...... 好", CleanConfig(max_punct_repeat=3))[0] == "分隔线 --- 结束 ... 好"


def test_boilerplate_lines_are_dropped_only_when_short():
    text = ("正文第一段。\n点击阅读全文\n版权所有 © 2023 某某网\n"
            "本文讨论了版权保护在医学出版中的作用，作者认为转载学术论文需要注明出处并取得授权，这一行很长所以保留。\n扫一扫关注我们")
    out, stats = doc_clean(text)
    assert out == "正文第一段。\n本文讨论了版权保护在医学出版中的作用，作者认为转载学术论文需要注明出处并取得授权，这一行很长所以保留。"
    assert stats["boilerplate_lines_dropped"] == 3
    assert doc_clean(text, CleanConfig(boilerplate=False))[0].count("\n") == 4


def test_zh_ratio_matches_a_regex_reference_on_real_text(samples):
    han = re.compile(r"[\u4000-\u9fff]")
    latin = re.compile(r"[A-Za-z]")
    lines = (samples / "skywork-zh-web/zh_general.jsonl").read_text().splitlines()[:50]
    lines += (samples / "llamafactory-demo/c4_demo.jsonl").read_text().splitlines()[:20]
    for line in lines:
        text = json.loads(line)["text"]
        h, la = len(han.findall(text)), len(latin.findall(text))
        assert zh_ratio(text) == pytest.approx(h / (h + la) if h else 0.0)
    assert zh_ratio("hello 世界") == pytest.approx(2 / 7) and zh_ratio("12345") == 0.0


def test_filters_drop_and_name_the_reason():
    c = Cleaner(CleanConfig(min_chars=5, max_chars=100, min_zh_ratio=0.5), "zh")
    assert c.clean({"kind": "doc", "text": "短"}) == "too_short"
    assert c.clean({"kind": "doc", "text": "长" * 101}) == "too_long"
    assert c.clean({"kind": "doc", "text": "长" * 10_000}) == "too_long"
    assert c.clean({"kind": "doc", "text": "This page is in English only, 中文"}) == "low_zh_ratio"
    assert c.clean({"kind": "doc", "text": "这是一段正常的中文文本。"}) is None
    en = Cleaner(CleanConfig(min_chars=5), "en")
    assert en.clean({"kind": "doc", "text": "An English guideline paragraph."}) is None


def test_conversation_and_preference_checks():
    c = Cleaner(CleanConfig(min_chars=2), "zh")
    conv = {"kind": "conv", "messages": [{"role": "system", "content": "  "}, {"role": "user", "content": "你好\u200b"},
                                         {"role": "assistant", "content": "你好！！！！！有什么可以帮你？"}]}
    assert c.clean(conv) is None
    assert conv["messages"] == [{"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "你好！！！！！有什么可以帮你？"}]
    assert c.clean({"kind": "conv", "messages": [{"role": "user", "content": "问题"},
                                                 {"role": "assistant", "content": " \n "}]}) == "empty_message"
    same = {"kind": "pref", "prompt": [{"role": "user", "content": "问题"}], "chosen": "一样。", "rejected": "一样。 "}
    assert c.clean(same) == "chosen_equals_rejected"
    good = {"kind": "pref", "prompt": [{"role": "user", "content": "问题"}], "chosen": "好的回答。", "rejected": "差"}
    assert c.clean(good) is None
