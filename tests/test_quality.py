"""The quality operators (data_process/quality.py): OpenCC t2s, language id, repetition and quality rules,
on the real samples and on hand-made hard cases."""
from collections import Counter

import numpy as np
import opencc
import pytest

from data_process import quality
from data_process.clean import Cleaner
from data_process.readers import READERS
from data_process.recipe import CleanConfig, RulesConfig

RULES = RulesConfig()


def real_docs(samples, reader, rel):
    path = samples / rel
    return [r["text"] for r in READERS[reader](path, path.name, None) if isinstance(r, dict)]


# ---------------------------------------------------------------- traditional -> simplified

TRADITIONAL = "醫生建議患者每日服藥兩次，並注意觀察血壓變化。糖尿病患者應當控制飲食，適當運動，定期檢查血糖。"
SIMPLIFIED = "医生建议患者每日服药两次，并注意观察血压变化。糖尿病患者应当控制饮食，适当运动，定期检查血糖。"


def test_t2s_converts_a_traditional_document_to_the_hand_written_simplified_text():
    out, changed = quality.to_simplified(TRADITIONAL, 0.05)
    assert changed and out == SIMPLIFIED


def test_t2s_leaves_simplified_real_text_alone_even_where_opencc_would_rewrite_names(samples):
    docs = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    converter = opencc.OpenCC("t2s")
    would_change = [d for d in docs if converter.convert(d) != d]
    assert would_change, "the sample has names t2s rewrites (梁靖崑, 华为昇腾): the gate is what keeps them"
    assert all(quality.to_simplified(d, 0.05) == (d, False) for d in docs)
    assert any("梁靖崑" in d for d in docs)


def test_t2s_gate_counts_exactly_the_characters_opencc_changes():
    text = TRADITIONAL + "梁靖崑"
    converter = opencc.OpenCC("t2s")
    n_changed = sum(a != b for a, b in zip(text, converter.convert(text)))
    n_han = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    assert quality.traditional_share(text) == pytest.approx(n_changed / n_han)


def reference_to_simplified(text: str, min_share: float, converter) -> tuple[str, bool]:
    """The t2s decision without the gate: OpenCC on everything, the share counted character by character."""
    out = converter.convert(text)
    han = [ch for ch in text if any(lo <= ord(ch) < hi for lo, hi in quality.HAN_RANGES)]
    trad = sum(1 for ch in han if converter.convert(ch) != ch)
    if out == text or (min_share > 0 and trad / max(1, len(han)) < min_share):
        return text, False
    return out, True


def test_t2s_gate_decides_as_opencc_on_everything_would(samples):
    converter = opencc.OpenCC("t2s")
    s2t = opencc.OpenCC("s2t")
    web = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    docs = web[:60] + [s2t.convert(d) for d in web[:20]]                 # long and short, both scripts
    docs += [d[:400] + "國" + d[400:] for d in web[:20] if len(d) > 600]  # one traditional character, past the
    docs += ["中\U00020000文", "𠁞" * 3 + "中文", "😀中文" * 300, "国" * 100 + "國" * 5, "国" * 100 + "國" * 6,   # numpy gate
             "說" + "x" * 600 + "😀", TRADITIONAL * 20 + "梁靖崑", ""]
    for doc in docs:
        for min_share in (0.05, 0.0):
            assert quality.to_simplified(doc, min_share) == reference_to_simplified(doc, min_share, converter)


compiled = pytest.mark.skipif(quality._text_kernels() is None, reason="no C compiler or Python headers")


def gate_cases(samples) -> list[str]:
    """Real documents in both scripts and of every storage width, and the edges of the compiled scan: the
    traditional character alone, at either end, on either side of its 64-character blocks; astral Han (the
    table's last entry and past it), lone surrogates, Latin-1 text."""
    s2t = opencc.OpenCC("s2t")
    web = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    path = samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv"
    dialogues = ["\n".join(m["content"] for m in r["messages"])
                 for r in READERS["medical_dialogue_csv"](path, path.name, None) if isinstance(r, dict)][:200]
    english = real_docs(samples, "text_jsonl", "llamafactory-demo/c4_demo.jsonl")[:50]
    edges = ["", "國", "国", "é" * 70, "國" + "国" * 200, "国" * 200 + "國", "\ud800", "国" * 63 + "\udfff"]
    edges += ["国" * k + "國" + "国" * 3 for k in (62, 63, 64, 65, 127, 128)]
    edges += [chr(cp) + "中文" for cp in (0x20000, 0x2A6DF, 0x2A6E0, 0x2A6E1, 0x2B740, 0x10FFFF, 0xFFFF, 0xF900)]
    return web + [s2t.convert(d) for d in web[:40]] + dialogues + english + edges


@compiled
def test_compiled_t2s_gate_decides_as_the_python_gate_on_real_samples_and_hard_cases(samples):
    docs = gate_cases(samples)
    compiled_gate = quality._t2s()[4]
    decided = [compiled_gate(d) for d in docs]
    assert decided == [quality._has_traditional_py(d) for d in docs]
    assert decided == [bool(np.count_nonzero(quality._kinds(d) >= quality.HAN_TRADITIONAL)) for d in docs]
    assert 40 < sum(decided) < len(docs) - 100


@compiled
def test_compiled_symbol_ratio_equals_the_regex_one(samples):
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    docs = gate_cases(samples) + ["★★ 好评 ..  . 热卖 ###", "※❤♥♡" + spaces + "#" * 3, spaces, "…" * 5 + "😀 ☆"]

    def regex_ratio(text):   # symbol_ratio as the regex path computes it
        n = len(quality.SYMBOLS.findall(text)) + (len(quality.DOTS.findall(text)) if text.count(".") >= 3 else 0)
        return n / max(1, len(quality.SPACE.sub("", text))) if n else 0.0

    ratios = [quality.symbol_ratio(d) for d in docs]
    assert ratios == [regex_ratio(d) for d in docs]
    assert sum(r > 0 for r in ratios) > 10


@compiled
def test_compiled_ngram_statistics_are_numpys_to_the_bit(samples):
    docs = repetitive_docs(samples) + gate_cases(samples)
    docs += ["".join(chr(0x20000 + i % 7) for i in range(300)), "a" * 12, "ab" * 6, "x", "\x00" * 40,
             "这是一段重复的文字。" * 30_000]
    lib = quality._text_kernels()
    for doc in docs:
        chars = "".join(doc.split())
        expected = {}
        if chars:
            quality._ngram_stats(np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32), expected)
        got = {}
        assert quality._ngram_stats_compiled(chars, got)
        assert got == expected, doc[:40]
        for n in range(1, 11):
            assert lib.dup_share(chars, n) == quality.dup_ngram_share_numpy(chars, n), (doc[:40], n)
    too_long = "这是一段重复的文字。" * (quality.NGRAM_C_MAX_CHARS // 10 + 1)   # rule_stats takes numpy's path
    assert not quality._ngram_stats_compiled(too_long, {})
    assert dict(zip(quality.NGRAM_STATS, lib.ngram_stats(too_long))) == {
        k: v for k, v in quality.rule_stats(too_long, RULES).items() if k in quality.NGRAM_STATS}


def test_t2s_still_refuses_a_lone_surrogate_for_the_cleaner_to_count():
    for text in ("正常的文字\ud800", "正常的文字" * 200 + "\udc00"):
        with pytest.raises(UnicodeEncodeError):
            quality.to_simplified(text, 0.05)
    assert Cleaner(CleanConfig(t2s=True), "zh").clean({"id": "x", "kind": "doc", "text": "文字\ud800"}) == "invalid_unicode"


def test_cleaner_t2s_counts_and_audits_before_and_after():
    cleaner = Cleaner(CleanConfig(t2s=True), "zh")
    record = {"id": "x:1", "kind": "doc", "text": TRADITIONAL}
    assert cleaner.clean(record) is None
    assert record["text"] == SIMPLIFIED and cleaner.stats["t2s_converted"] == 1
    [entry] = cleaner.audit
    assert entry["op"] == "t2s" and entry["before"].startswith("醫生") and entry["after"].startswith("医生")


# ---------------------------------------------------------------- language id

JA_SHORT = ["今日はとても良い天気ですね。", "この薬は食後に飲んでください。", "病院へ行く前に予約が必要です。"]
KO_SHORT = ["오늘은 날씨가 정말 좋네요.", "이 약은 식후에 드세요.", "병원에 가기 전에 예약이 필요합니다."]
JA_LONG = ("高血圧は自覚症状がほとんどないため、定期的に血圧を測ることが大切です。塩分を控えた食事を心がけ、"
           "適度な運動を続けることで血圧を下げることができます。薬を飲み始めたら、自己判断でやめないでください。")
KO_LONG = ("고혈압은 자각 증상이 거의 없기 때문에 정기적으로 혈압을 측정하는 것이 중요합니다. 염분을 줄인 식사를 하고 "
           "적당한 운동을 꾸준히 하면 혈압을 낮출 수 있습니다. 약을 먹기 시작했다면 스스로 판단해서 끊지 마세요.")
MIXED = ("本研究采用随机对照试验。The primary endpoint was all-cause mortality at 30 days. "
         "结果显示，治疗组死亡率显著降低。Secondary endpoints included length of hospital stay.")


def test_langid_labels_real_chinese_and_english_and_hand_written_japanese_and_korean(samples):
    zh = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")[:40]
    en = real_docs(samples, "text_jsonl", "llamafactory-demo/c4_demo.jsonl")[:40]
    assert Counter(quality.detect_language(d)[0] for d in zh)["zh"] == len(zh)
    assert Counter(quality.detect_language(d)[0] for d in en)["en"] == len(en)
    for text in JA_SHORT + [JA_LONG]:
        assert quality.detect_language(text)[0] == "ja", text
    for text in KO_SHORT + [KO_LONG]:
        assert quality.detect_language(text)[0] == "ko", text


def test_langid_keeps_what_the_corpus_lang_takes():
    assert quality.language_matches(MIXED, "mixed", 20)[0]
    assert not quality.language_matches(JA_LONG, "zh", 20)[0]
    assert not quality.language_matches(KO_LONG, "mixed", 20)[0]
    assert quality.language_matches("疼痛", "zh", 20)[0]           # too short to judge: kept
    classical = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？"
    assert quality.language_matches(classical, "zh", 20)[0]
    code_page = ("下面的代码计算列表中所有数的平方和，注意缩进：\n```python\ndef square_sum(xs):\n    return sum(x * x for x in xs)\n"
                 "```\n运行后输出结果为十四。这个函数可以用于统计分析中的方差计算。")
    assert quality.language_matches(code_page, "zh", 20)[0]


def test_cleaner_drops_a_japanese_page_from_a_chinese_corpus_and_samples_it():
    cleaner = Cleaner(CleanConfig(langid=True, min_zh_ratio=0.0), "zh")
    assert cleaner.clean({"id": "ja:1", "kind": "doc", "text": JA_LONG}) == "lang_mismatch"
    assert cleaner.audit[0]["op"] == "lang_mismatch" and cleaner.audit[0]["lang"] == "ja"


# ---------------------------------------------------------------- repetition and quality rules


def reference_dup_ngram_share(chars: str, n: int) -> float:
    """Gopher's duplicated n-gram fraction, computed the slow obvious way."""
    grams = Counter(chars[i:i + n] for i in range(len(chars) - n + 1))
    covered = [False] * len(chars)
    for i in range(len(chars) - n + 1):
        if grams[chars[i:i + n]] > 1:
            for k in range(i, i + n):
                covered[k] = True
    return sum(covered) / len(chars)


def reference_symbol_ratio(text: str) -> float:
    chars = "".join(text.split())
    return (sum(chars.count(c) for c in quality.SYMBOL_CHARS) + chars.count("...")) / max(1, len(chars))


def repetitive_docs(samples) -> list[str]:
    """Real documents of every length, from both sides of the hashing's short/long switch, with repeats at
    every order: web pages, dialogues, and the spam pages of the hard cases built from real lines."""
    web = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    path = samples / "toyhom-medical-dialogue/样例_内科5000-6000.csv"
    dialogues = ["\n".join(m["content"] for m in r["messages"])
                 for r in READERS["medical_dialogue_csv"](path, path.name, None) if isinstance(r, dict)][:40]
    line = web[0].split("\n")[0][:40]
    spam = ["\n".join([line] * 6 + [NEWS]), (line + NEWS) * 30, line[:7] * 40, "\n".join(web[1:3] * 2)]
    return web[:12] + dialogues + spam


def test_ngram_statistics_equal_a_plain_python_reference_on_real_documents(samples):
    for doc in repetitive_docs(samples):
        stats = quality.rule_stats(doc, RULES)
        chars = "".join(doc.split())
        if len(chars) < RULES.min_ngram_chars:
            continue
        for n in (2, 3, 4):
            top = Counter(chars[i:i + n] for i in range(len(chars) - n + 1)).most_common(1)[0][1]
            assert stats[f"top_{n}gram"] == pytest.approx(top * n / len(chars))
        for n in range(5, 11):
            assert stats[f"dup_{n}gram"] == pytest.approx(reference_dup_ngram_share(chars, n))


def test_single_order_dup_share_and_symbol_ratio_equal_the_plain_reference(samples):
    docs = repetitive_docs(samples) + ["★★ 好评 ..  . 热卖 ###", "短", "", "a. b. c."]
    lengths = {len("".join(d.split())) >= quality.WINDOW_DOT_CHARS for d in docs}
    assert lengths == {True, False}, "both hashings are exercised"
    for doc in docs:
        chars = "".join(doc.split())
        for n in (5, 10):
            expected = reference_dup_ngram_share(chars, n) if chars else 0.0
            assert quality.dup_ngram_share(chars, n) == pytest.approx(expected)
        assert quality.symbol_ratio(doc) == pytest.approx(reference_symbol_ratio(doc))


def test_the_32_bit_window_hash_is_the_low_half_of_the_64_bit_one(samples):
    # what makes the 32-bit pre-check exact: distinct low halves mean distinct hashes
    for doc in repetitive_docs(samples)[:14]:
        cps = np.frombuffer("".join(doc.split()).encode("utf-32-le"), dtype=np.uint32)
        for n in (2, 5, 10):
            if len(cps) >= n:
                low = quality._window_hashes(cps, n, np.uint32)
                assert low.dtype == np.uint32
                assert np.array_equal(low, quality._window_hashes(cps, n).astype(np.uint32))


def reference_flagged_per_kchar(text: str) -> float:
    """Flagged words per 1000 characters the plain way: whitespace removed, lowercased, scanned left to right,
    at each position the longest word that starts there counted and skipped."""
    chars = "".join(text.split())
    lowered, words = chars.lower(), sorted(quality.FLAGGED_LOWER, key=len, reverse=True)
    hits = i = 0
    while i < len(lowered):
        word = next((w for w in words if lowered.startswith(w, i)), None)
        hits, i = (hits + 1, i + len(word)) if word else (hits, i + 1)
    return hits * 1000 / max(len(chars), 1000)


def test_flagged_words_equal_a_plain_reference_on_real_text_and_spaced_or_cased_words(samples):
    docs = (real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
            + real_docs(samples, "text_jsonl", "llamafactory-demo/c4_demo.jsonl")[:100])
    spam = []
    for word in quality.FLAGGED_WORDS:
        spam += [" \n\u3000".join(word) + "。", word.upper() + NEWS, NEWS + word + word, word.replace("k", "\u212a")]
    spam += ["北京PK10开奖", "加QQ领彩金", "AV女优", "线上娱乐城真人娱乐城"]
    for text in docs + spam:
        assert quality.flagged_per_kchar(text) == pytest.approx(reference_flagged_per_kchar(text)), text
    assert sum(quality.flagged_per_kchar(t) > 0 for t in spam) == len(spam)


@compiled
def test_compiled_flagged_word_count_equals_the_regex_findall(samples):
    docs = (real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
            + real_docs(samples, "text_jsonl", "llamafactory-demo/c4_demo.jsonl")[:100])
    spam = []
    for word in quality.FLAGGED_WORDS:   # spaced, cased, repeated, cut short, at the end, overlapping
        spam += [" \n\u3000".join(word) + "。", word.upper() + NEWS, NEWS + word + word, word.replace("k", "\u212a"),
                 word[:-1], word[:-1] + " ", NEWS + word, word + word[1:] + word, "\u3000".join(word) + " \t"]
    spam += ["北京PK10开奖", "加QQ领彩金", "AV女优", "线上娱乐城真人娱乐城", "自拍偷拍偷拍", "赌博网上赌", "😀博彩𠀀赌场", ""]
    lib = quality._text_kernels()
    counts = [lib.count_words(quality.FLAGGED_FIRST_BITMAP, quality.FLAGGED_PROGRAM, quality.space_bitmap(), t)
              for t in docs + spam]
    assert counts == [len(quality.FLAGGED.findall(t)) for t in docs + spam]
    assert sum(counts) > len(spam)


def test_only_the_kelvin_sign_lowercases_to_an_ascii_letter():
    # what flagged_per_kchar's case handling assumes (quality._lowercasing_to)
    odd = {chr(cp) for cp in range(0x80, 0x110000)
           if len(chr(cp).lower()) == 1 and chr(cp).lower().isascii() and chr(cp).lower().isalpha()}
    assert odd == {"\u212a"}


def test_real_web_and_book_text_mostly_passes_the_rules(samples):
    web = real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
    failed = Counter(quality.check_rules(quality.rule_stats(d, RULES), RULES) for d in web)
    assert failed[None] >= 0.9 * len(web)
    assert set(failed) <= {None, "punct_end_lines"}    # the "详情点击>>" link digests (config/recipe.toml)


NEWS = "国家卫生健康委员会今天发布了新版诊疗指南，强调早期筛查的重要性。"


@pytest.mark.parametrize("text, reason", [
    ("\n".join(["欢迎访问本站，最新优惠活动火热进行中！"] * 6 + [NEWS] * 2), "dup_line_frac"),
    ("\n".join(["首页", "新闻", "体育", "娱乐", "财经", "科技", "登录", NEWS]), "short_lines"),
    ("\n".join(f"• 第{i}条内容没有任何结尾标点的列表项目说明文字" for i in range(8)), "bullet_lines"),
    ("\n".join([f"这是第{i}段文字的开头但是没有说完就结束了……" for i in range(6)]), "ellipsis_lines"),
    ("\n".join([f"导航栏目第{i}组链接文字甲乙丙丁" for i in range(8)] + [NEWS]), "punct_end_lines"),   # 1/9 < 0.12
    ("★★★★★ 五星好评 ★★★★★ ■■■ 限时抢购 ■■■ ###### 热卖 ###### ……" + NEWS, "symbol_ratio"),
    ("线上娱乐城百家乐真人娱乐，首存送彩金，时时彩北京赛车，老虎机返水提款秒到。" + NEWS, "flagged_words"),
    ("买买买" * 100, "top_2gram"),
    (("本店专业销售各类品牌手机配件，欢迎选购，价格实惠质量保证。" * 12) + NEWS * 2, "dup_5gram"),
])
def test_hand_made_bad_pages_fail_the_rule_that_describes_them(text, reason):
    assert quality.check_rules(quality.rule_stats(text, RULES), RULES) == reason


@pytest.mark.parametrize("text", [
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？曾子曰：吾日三省吾身。为人谋而不忠乎？"
    "与朋友交而不信乎？传不习乎？子曰：道千乘之国，敬事而信，节用而爱人，使民以时。" * 2,   # classical Chinese (repeated
    # once, as anthologies quote it)
    "常用抗生素剂量表：\n| 药物 | 剂量 | 频次 |\n|---|---|---|\n| 阿莫西林 | 0.5g | 每日3次 |\n| 头孢呋辛 | 0.25g | 每日2次 |\n"
    "| 左氧氟沙星 | 0.5g | 每日1次 |\n以上剂量仅供成人参考，儿童需按体重计算。",
    "患者男，56岁，血压160/100mmHg，空腹血糖7.8mmol/L，糖化血红蛋白8.2%，诊断为2型糖尿病（E11.9）合并高血压（I10）。"
    "给予二甲双胍0.5g每日三次，氨氯地平5mg每日一次，2023年9月1日复查，血糖降至6.1mmol/L。",
])
def test_hand_made_good_texts_pass(text):
    assert quality.check_rules(quality.rule_stats(text, RULES), RULES) is None


def test_cleaner_rule_drop_is_named_and_sampled_with_its_value():
    cleaner = Cleaner(CleanConfig(rules=True), "zh")
    text = "\n".join(["欢迎访问本站，最新优惠活动火热进行中！"] * 6 + [NEWS] * 2)
    assert cleaner.clean({"id": "spam:1", "kind": "doc", "text": text}) == "rule_dup_line_frac"
    assert cleaner.audit == [{"op": "rule_dup_line_frac", "id": "spam:1", "value": 0.75, "text": text[:300]}]
    gambling = "线上娱乐城百家乐真人娱乐，首存送彩金，时时彩北京赛车，老虎机返水提款秒到。" + NEWS
    assert cleaner.clean({"id": "spam:2", "kind": "doc", "text": gambling}) == "rule_flagged_words"
    assert cleaner.audit[-1]["value"] == 10.0   # 线上娱乐城 百家乐 真人娱乐 首存 彩金 时时彩 北京赛车 老虎机 返水 提款秒到, per 1000 chars


def test_rule_settings_come_from_the_recipe_and_bad_values_are_errors(tmp_path):
    from data_process.recipe import RecipeError, parse_recipe

    raw = {"clean": {"rules": True, "quality_rules": {"max_dup_line_frac": 0.5}},
           "corpus": [{"name": "web", "reader": "text_jsonl", "paths": ["x"],
                       "clean": {"quality_rules": {"max_short_lines": 0.9}}}]}
    spec = parse_recipe(raw, tmp_path).corpora[0]
    assert spec.clean.rules and spec.clean.quality_rules.max_dup_line_frac == 0.5
    assert spec.clean.quality_rules.max_short_lines == 0.9
    with pytest.raises(RecipeError, match="max_dup_ngram"):
        parse_recipe({"clean": {"quality_rules": {"max_dup_ngram": [0.5]}}}, tmp_path)
    with pytest.raises(RecipeError, match="out of range"):
        parse_recipe({"clean": {"quality_rules": {"max_bullet_lines": 1.5}}}, tmp_path)


def test_rules_on_empty_whitespace_and_huge_repetitive_text_do_not_crash():
    for text in ("", "   \n\n  ", "a", "。"):
        assert quality.check_rules(quality.rule_stats(text, RULES), RULES) is None
    big = "这是一段重复的文字。" * 50_000          # 500K characters
    assert quality.check_rules(quality.rule_stats(big, RULES), RULES) == "top_3gram"   # top 2-gram: exactly 0.20
    assert np.isfinite(quality.rule_stats("\x00\x01\ufffd" * 100, RULES)["dup_5gram"])


def test_script_fast_path_agrees_with_py3langid_on_every_real_document_it_decides(samples):
    docs = (real_docs(samples, "text_jsonl", "skywork-zh-web/zh_general.jsonl")
            + real_docs(samples, "plain_text", "medicalgpt/pretrain/fever.txt")
            + real_docs(samples, "text_jsonl", "firefly/dummy_pretrain.jsonl"))
    from data_process.clean import zh_ratio

    fast = [d for d in docs if len(d) >= 20 and quality.KANA_HANGUL.search(d[:quality.LANGID_CHARS]) is None
            and zh_ratio(d[:quality.LANGID_CHARS]) >= quality.FAST_ZH_MIN_HAN]
    assert len(fast) >= 0.8 * len(docs)
    assert all(quality.detect_language(d)[0] in quality.ZH_CODES for d in fast)
    assert not quality.language_matches(JA_LONG, "zh", 20)[0] and not quality.language_matches(KO_LONG, "zh", 20)[0]
