"""Cleaning and filtering, per record kind. Fast (regexes and str methods only), and it never rewrites words.

`Cleaner(settings, lang).clean(record) -> reason | None` cleans a record in place and returns None when
it is kept, or the reason it is dropped ("too_short", "too_long", "low_zh_ratio", "empty_message",
"chosen_equals_rejected"). `Cleaner.stats` (a Counter) counts what every filter changed or dropped.

What it does, and why:
- Unicode NFKC, except the characters where NFKC loses meaning in Chinese medical text: full-width Chinese
  punctuation (，。：；！？（） would become ASCII, changing how Chinese text reads and tokenizes), the
  ellipsis …, superscripts/subscripts (10⁹/L must not become 109/L, m² not m2) and circled numbers ①②.
  Full-width letters and digits (ＣＴ１２) do become ASCII, and compatibility ideographs their unified form.
- Control characters, zero-width characters and the BOM are removed; \\r\\n and \\r become \\n.
- Documents: runs of spaces/tabs inside a line become one space, lines are stripped, 3+ newlines become 2,
  runs of one punctuation mark longer than `max_punct_repeat` are shortened ("！！！！！" -> "！！！"),
  and obvious web boilerplate lines (copyright, "点击阅读全文", "扫一扫关注") are dropped.
  Conversations and preference pairs keep their inner spacing and punctuation runs (code, markdown tables).
- Conversations: a turn left empty by cleaning ends the conversation; the complete user/assistant pairs before
  it are kept (stats convs_truncated_empty_turn, turns_cut_empty_turn), none left is "empty_message". What the
  reader cut (a turn breaking the alternation, a trailing user turn: the record's "cut") is counted the same way.
- Filters: min/max characters, and for lang="zh" the share of Han characters among Han + Latin letters.
- Quality operators, each off unless the corpus's [clean] turns it on (config/recipe.toml sets the defaults per
  corpus; order and reasons: docs/cleaning.md): OpenCC traditional -> simplified (`t2s`), language id
  (`langid`, documents), the Gopher/C4/FineWeb repetition and quality rules and flagged words (`rules`,
  documents), typed PII placeholders (`pii`), model quality scores (`quality_model`, documents). What each changes
  is counted in `stats`; `Cleaner.audit` keeps a bounded before/after sample per operator for auditing.
Unlike baby-llama2-chinese's punctuation cleaner (which turned "blood pressure" into "blood，presure"),
nothing here touches letters or the spaces between English words.
"""
from __future__ import annotations

import array
import re
import sys
import unicodedata
from collections import Counter

from data_process import pii, quality
from data_process.readers import valid_prefix
from data_process.recipe import CleanConfig

# ---------------------------------------------------------------- NFKC, minus what it would corrupt


NFKC_BLOCK = 2048
NATIVE_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"   # array("I") holds native order


def _keep_as_is(ch: str) -> bool:
    cp = ord(ch)
    if 0xFF01 <= cp <= 0xFF65:  # full-width forms: keep punctuation, convert letters and digits
        return not ch.isalnum()
    if 0x2070 <= cp <= 0x209F or ch in "\u00b2\u00b3\u00b9":  # superscripts and subscripts
        return True
    if 0x2460 <= cp <= 0x24FF or 0x3251 <= cp <= 0x32BF:  # circled numbers and letters
        return True
    return ch in "\u2026\u2025\u3000"  # … ‥ and the ideographic space (handled as whitespace below)


def _build_nfkc_table() -> dict[str, str]:
    """Every character NFKC changes on its own (and the cleaner should change), with its normalized form. Blocks
    of code points that are NFKC-normalized as a whole (most of Unicode: unassigned planes, private use, most
    scripts) are passed over in one call, so building the table at import costs milliseconds, not the ~0.3 s a
    per-character scan of all 1.1M code points took in every worker process (test_clean pins it to that scan)."""
    table = {}
    for lo in range(0, sys.maxunicode + 1, NFKC_BLOCK):
        if 0xD800 <= lo <= 0xDFFF:   # surrogates (whole blocks: 0xD800 and 0xE000 are multiples of the block)
            continue
        block = array.array("I", range(lo, lo + NFKC_BLOCK)).tobytes().decode(NATIVE_UTF32)
        if unicodedata.is_normalized("NFKC", block):
            continue
        for ch in block:
            norm = unicodedata.normalize("NFKC", ch)
            if norm != ch and not _keep_as_is(ch) and unicodedata.combining(ch) == 0:
                table[ch] = norm
    return table


def _char_class(chars) -> str:
    """A regex character class for a set of characters, written as ranges."""
    cps = sorted(ord(c) for c in chars)
    ranges, start, prev = [], cps[0], cps[0]
    for cp in cps[1:]:
        if cp != prev + 1:
            ranges.append((start, prev))
            start = cp
        prev = cp
    ranges.append((start, prev))
    return "[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]"


NFKC_TABLE = _build_nfkc_table()
# Two classes: sre matches a BMP-only class through a bitmap (~350 MB/s) but a class with astral ranges through
# a range list (~8 MB/s), so astral characters are looked for only when the text has any.
NFKC_BMP = re.compile(_char_class(c for c in NFKC_TABLE if ord(c) < 0x10000))
NFKC_ASTRAL = re.compile(_char_class(c for c in NFKC_TABLE if ord(c) >= 0x10000))
ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _nfkc_char(m: re.Match) -> str:
    return NFKC_TABLE[m.group()]


def nfkc_safe(text: str, check_astral: bool = True) -> str:
    """NFKC per character except the kept set above, then NFC so combining sequences compose."""
    if text.isascii():  # ASCII is NFKC-invariant (and most English text is ASCII)
        return text
    text = NFKC_BMP.sub(_nfkc_char, text)
    if check_astral and ASTRAL.search(text) is not None:
        text = NFKC_ASTRAL.sub(_nfkc_char, text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


# ---------------------------------------------------------------- characters and whitespace

# C0 (except \t \n \r), DEL, C1, zero-width space/joiners, word joiner, BOM, interlinear annotation, specials
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ufff9-\ufffb]")
# Runs of 2+ spaces, or any other horizontal space (a class matching every single space would rewrite each word gap).
H_SPACE = re.compile("[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
ODD_SPACE = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Everything the three classes above and \r and astral characters match, in one class: most text has none of
# them, and one scan (~900 MB/s) then replaces four.
RARE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u00a0\u1680\u2000-\u200d\u202f\u205f\u2060\u3000\ufeff\ufff9-\ufffb"
                  "\U00010000-\U0010ffff]")
MANY_NEWLINES = re.compile(r"\n{3,}")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
PUNCT = "!?,.;:~\\-=*#_·。，！？、；：～—…．"


def punct_run_regex(max_repeat: int) -> re.Pattern:
    return re.compile(f"([{re.escape(PUNCT)}])\\1{{{max_repeat},}}")


# Whole lines that are web-page furniture, not content. Deliberately narrow: a line is dropped only when it is
# short and matches, so a sentence that merely mentions 版权 stays.
BOILERPLATE = re.compile(
    r"版权所有|版权声明|免责声明|转载请注明|未经授权|点击(查看|阅读|进入|这里|下载)|阅读全文|阅读原文|扫一扫|扫码关注|"
    r"关注(我们|公众号|微信)|上一篇|下一篇|返回(首页|顶部)|责任编辑|分享到|相关阅读|热门推荐|ICP备|Copyright|"
    r"All rights reserved|Powered by",
    re.I,
)
BOILERPLATE_MAX_LINE = 50
# A cheap pre-test: an alternation of Chinese literals scans at ~900 MB/s (the full pattern at ~40 MB/s); the
# English words are looked for with `in`, which is faster than a regex on ASCII text.
BOILERPLATE_ZH = re.compile("版权|声明|转载|未经授权|点击|阅读|扫一扫|扫码|关注|上一篇|下一篇|返回|责任编辑|分享到|热门推荐|ICP备")
BOILERPLATE_EN = ("Copyright", "copyright", "COPYRIGHT", "rights reserved", "Rights Reserved", "RIGHTS RESERVED",
                  "Powered by", "powered by", "POWERED BY")


def drop_boilerplate_lines(text: str, stats: Counter) -> str:
    """Drop whole lines that are web-page furniture: short (<= 50 chars) and naming copyright, "read more",
    "follow us", next/previous article... Deliberately narrow: a long sentence that mentions 版权 stays."""
    if BOILERPLATE_ZH.search(text) is None and not any(w in text for w in BOILERPLATE_EN):
        return text
    lines = text.split("\n")
    kept = [line for line in lines if len(line) > BOILERPLATE_MAX_LINE or BOILERPLATE.search(line) is None]
    if len(kept) == len(lines):
        return text
    stats["boilerplate_lines_dropped"] += len(lines) - len(kept)
    return "\n".join(kept)


LATIN_BYTES = bytes(range(65, 91)) + bytes(range(97, 123))
HAN_LEAD_BYTES = bytes(range(0xE4, 0xEA))


def zh_ratio(text: str) -> float:
    """Han characters / (Han characters + Latin letters); 0 when there are neither.
    Counted on the UTF-8 bytes: U+4000..U+9FFF (CJK Unified Ideographs and most of Extension A) are exactly the
    3-byte sequences led by 0xE4..0xE9, which bytes.translate counts at memory speed (a regex runs at ~25 MB/s)."""
    data = text.encode("utf-8", "surrogatepass")
    han = len(data) - len(data.translate(None, HAN_LEAD_BYTES))
    if han == 0:
        return 0.0
    latin = len(data) - len(data.translate(None, LATIN_BYTES))
    return han / (han + latin)


def _normalize(text: str, settings: CleanConfig, stats: Counter) -> tuple[str, bool]:
    """What every text kind gets: NFKC (safe), control characters out, CR/CRLF -> LF. Returns (text, rare), where
    rare says the text has characters outside the common ranges (the slower checks only run then)."""
    rare = RARE.search(text) is not None
    if settings.nfkc:
        text = nfkc_safe(text, check_astral=rare)
    if rare:
        if CONTROL.search(text):
            stats["control_chars_removed"] += 1
            text = CONTROL.sub("", text)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text, rare


def clean_text(text: str, settings: CleanConfig, stats: Counter, punct_run: re.Pattern | None = None) -> str:
    """Full cleaning for pretraining documents."""
    text, rare = _normalize(text, settings, stats)
    if "  " in text or (rare and ODD_SPACE.search(text)):
        text = H_SPACE.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = "\n".join(line.strip() for line in text.split("\n"))
    if "\n\n\n" in text:
        text = MANY_NEWLINES.sub("\n\n", text)
    if punct_run is not None and punct_run.search(text) is not None:
        text, n = punct_run.subn(lambda m: m.group(1) * settings.max_punct_repeat, text)
        if n:
            stats["punct_runs_shortened"] += n
    if settings.boilerplate:
        text = drop_boilerplate_lines(text, stats)
    return text.strip()


def clean_message(text: str, settings: CleanConfig, stats: Counter) -> str:
    """Light cleaning for conversation turns and answers: keeps inner spacing (code, tables) and punctuation."""
    text, rare = _normalize(text, settings, stats)
    if rare and ODD_SPACE.search(text):
        text = ODD_SPACE.sub(lambda m: "    " if m.group() == "\t" else " ", text)
    if " \n" in text:
        text = TRAILING_SPACE.sub("\n", text)
    return text.strip()


def _length_and_lang(text: str, settings: CleanConfig, lang: str) -> str | None:
    n = len(text)
    if n < settings.min_chars:
        return "too_short"
    if n > settings.max_chars:
        return "too_long"
    if lang == "zh" and settings.min_zh_ratio > 0 and zh_ratio(text) < settings.min_zh_ratio:
        return "low_zh_ratio"
    return None


AUDIT_CHARS = 300       # characters of context either side of the first change in an audit sample


def _audit_window(before: str, after: str) -> dict:
    """The stretch of text around the first difference, before and after (bounded)."""
    i = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    lo = max(0, i - AUDIT_CHARS)
    return {"at": i, "before": before[lo:i + AUDIT_CHARS], "after": after[lo:i + AUDIT_CHARS]}


class Cleaner:
    """Cleans records of one corpus (its settings and language fixed); `clean(record) -> drop reason | None`.
    `stats` counts what every filter and operator changed; `audit` holds up to `audit_samples` entries per
    operator ({"op", "id", ...}: before/after windows for changes, the measured values for drops)."""

    def __init__(self, settings: CleanConfig, lang: str, scorer=None):
        self.settings, self.lang = settings, lang
        self.stats: Counter = Counter()
        self.audit: list[dict] = []
        self._audit_counts: Counter = Counter()
        self.punct_run = punct_run_regex(settings.max_punct_repeat) if settings.max_punct_repeat > 0 else None
        self.scorer = scorer       # data_process.quality_model.Scorer, or None

    def _sample(self, op: str, entry: dict) -> None:
        if self._audit_counts[op] < self.settings.audit_samples:
            self._audit_counts[op] += 1
            self.audit.append({"op": op, **entry})

    def _t2s(self, text: str, rid: str) -> str:
        out, changed = quality.to_simplified(text, self.settings.t2s_min_share)
        if changed:
            self.stats["t2s_converted"] += 1
            self._sample("t2s", {"id": rid, **_audit_window(text, out)})
        return out

    def _pii(self, text: str, rid: str) -> str:
        found = []
        out, counts = pii.scrub(text, found)
        if counts:
            for placeholder, n in counts.items():
                self.stats["pii_" + placeholder.strip("<>").lower()] += n
            self._sample("pii", {"id": rid, "replaced": [[ph, pii.mask(v)] for ph, v in found],
                                 "after": _audit_window(text, out)["after"]})
        return out

    def _rewrite(self, text: str, rid: str) -> str:
        """t2s and PII on one message."""
        if self.settings.t2s and text:
            text = self._t2s(text, rid)
        if self.settings.pii and text:
            text = self._pii(text, rid)
        return text

    def _judge_doc(self, record: dict) -> str | None:
        """Language id, then the repetition and quality rules (documents only)."""
        s, text = self.settings, record["text"]
        if s.langid:
            ok, lang, prob = quality.language_matches(text, self.lang, s.langid_min_chars)
            if not ok:
                self._sample("lang_mismatch", {"id": record["id"], "lang": lang, "prob": round(prob, 3),
                                               "text": text[:AUDIT_CHARS]})
                return "lang_mismatch"
        if s.rules:
            stats = quality.rule_stats(text, s.quality_rules)
            failed = quality.check_rules(stats, s.quality_rules)
            if failed is not None:
                reason = "rule_" + failed
                self._sample(reason, {"id": record["id"], "value": round(quality.rule_value(stats, failed), 4),
                                      "text": text[:AUDIT_CHARS]})
                return reason
        return None

    def clean(self, record: dict) -> str | None:
        try:
            return self._clean(record)
        except UnicodeEncodeError:   # a lone surrogate (a hand-made dict; orjson never loads one): OpenCC needs UTF-8
            return "invalid_unicode"

    def _clean(self, record: dict) -> str | None:
        # Absurdly long input is rejected before any regex runs over it.
        kind = record["kind"]
        s = self.settings
        rid = record.get("id", "")
        if kind == "doc":
            if len(record["text"]) > s.max_chars * 2:
                return "too_long"
            record["text"] = clean_text(record["text"], s, self.stats, self.punct_run)
            if s.t2s:   # before the filters: the Chinese ratio and langid judge the simplified text
                record["text"] = self._t2s(record["text"], rid)
            if "title" in record:
                record["title"] = clean_message(record["title"], s, self.stats)
                if s.t2s:
                    record["title"] = self._t2s(record["title"], rid)
            reason = _length_and_lang(record["text"], s, self.lang) or self._judge_doc(record)
            if reason is not None:
                return reason
            if s.pii:   # after the rules (they judge the text as written) and before the model scores
                record["text"] = self._pii(record["text"], rid)
                if "title" in record:
                    record["title"] = self._pii(record["title"], rid)
            if self.scorer is not None:   # last: the scores describe the text as it is kept
                record["scores"] = self.scorer.score(record["text"])
                reason = self.scorer.keep_or_reason(record["scores"], rid)
                if reason is not None:
                    self._sample(reason, {"id": rid, **record["scores"], "text": record["text"][:AUDIT_CHARS]})
                    return reason
            return None
        if kind == "conv":
            for reason, turns in record.pop("cut", {}).items():   # what the reader cut (readers.conv)
                self.stats[f"convs_truncated_{reason}"] += 1
                self.stats[f"turns_cut_{reason}"] += turns
            for m in record["messages"]:
                if len(m["content"]) > s.max_chars * 2:
                    return "too_long"
                m["content"] = self._rewrite(clean_message(m["content"], s, self.stats), rid)
            # an empty turn (often a reply that was one zero-width space) ends the conversation: the complete
            # pairs before it are kept, and what was cut is counted
            record["messages"], cut = valid_prefix(record["messages"])
            if not any(m["role"] == "assistant" for m in record["messages"]):
                return "empty_message"
            if cut:
                self.stats["convs_truncated_empty_turn"] += 1
                self.stats["turns_cut_empty_turn"] += cut
            return _length_and_lang("\n".join(m["content"] for m in record["messages"]), s, self.lang)
        if kind == "pref":
            if len(record["chosen"]) + len(record["rejected"]) > s.max_chars * 2:
                return "too_long"
            for m in record["prompt"]:
                m["content"] = self._rewrite(clean_message(m["content"], s, self.stats), rid)
                if not m["content"] and m["role"] != "system":
                    return "empty_message"
            record["prompt"] = [m for m in record["prompt"] if m["content"]]
            record["chosen"] = self._rewrite(clean_message(record["chosen"], s, self.stats), rid)
            record["rejected"] = self._rewrite(clean_message(record["rejected"], s, self.stats), rid)
            if not record["chosen"] or not record["rejected"]:
                return "empty_message"
            if record["chosen"] == record["rejected"]:
                return "chosen_equals_rejected"
            prompt_text = "\n".join(m["content"] for m in record["prompt"])
            return _length_and_lang(prompt_text + "\n" + record["chosen"], s, self.lang)
        raise ValueError(f"unknown record kind {kind!r}")

