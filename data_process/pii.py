"""Typed PII scrubbing for Chinese text: personal data becomes a placeholder that says what it was.

`scrub(text) -> (text, Counter)` replaces, in this order (the longer, checked forms first, so a resident ID is not
also read as a phone number):
- `<EMAIL>`   addresses (local@domain.tld)
- `<URL>`     http(s):// and www. links (ASCII characters; trailing punctuation stays outside)
- `<IP>`      IPv4 addresses (four dotted 0..255 parts), after an "IP" keyword or with a 3-digit part
- `<ID>`      mainland resident ID numbers: 18 characters (17 digits + digit or X), first digit a region (1..8),
              a real birth date (1900..2099), and the GB 11643-1999 ISO 7064 MOD 11-2 check character
- `<CARD>`    bank cards: 16..19 digits (may be grouped in fours by spaces or hyphens), a UnionPay / Visa /
              Mastercard / JCB prefix, and a valid Luhn check digit
- `<PHONE>`   mobile numbers (1[3-9] + 9 digits, optionally +86 / 86-, spaced 3-4-4) and landlines written with
              an area code (0 + 2..3 digits, then a separator, then 7..8 digits: 010-12345678, (0571)8888 8888),
              also 400/800 service numbers written with hyphens
- `<QQ>` / `<WECHAT>`  only after a keyword (QQ, 扣扣, 企鹅号 / 微信, 微信号, VX, wx, 加V...): a 5..11 digit
              number alone is a lab value or a price far more often than a QQ id.
Every number pattern needs non-digit neighbours, so digits inside a longer number (a lab value 41350000, a
stock code 600302.SH, 4.1359e+007) never match; doses (0.5mg), dates (2023-09-01, 2023.09.01), years, ICD
codes (E11.9, K29.701) and prices (¥1,299.00) have no pattern here that fits them. A regex is written by hand
because no maintained library covers Chinese ID/phone/QQ formats (presidio's recognizers are English-centred).
"""
from __future__ import annotations

import re
from collections import Counter

PLACEHOLDERS = ("<EMAIL>", "<URL>", "<IP>", "<ID>", "<CARD>", "<PHONE>", "<QQ>", "<WECHAT>")

# Number boundaries: not preceded or followed by a digit or letter, nor by a digit one space or hyphen away
# (so four-digit groups inside a longer grouped number are not read as a landline).
ND = r"(?<![0-9A-Za-z])(?<![0-9][ -])"
NA = r"(?![0-9A-Za-z])(?![ -][0-9])"

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
                   r"(?![A-Za-z0-9])")
# ASCII URL characters only (a Chinese sentence often follows a link with no space), not ending in punctuation.
URL = re.compile(r"(?:https?:/{0,2}|(?<![A-Za-z0-9.])www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&*+,;=%]*[A-Za-z0-9/_#=&%~-]",
                 re.I)
# An IPv4 address with a 3-digit part, or any after "IP": "5.64.52.9" in an ultrasound report is a size.
IP = re.compile(r"(?:(?<![A-Za-z])(?:IP|ip|Ip)(?:地址)?\s*[:：是为]?\s*)?" + ND + r"(?<!\.)"
                r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)" + NA)
ID = re.compile(ND + r"[1-8]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]" + NA)
CARD = re.compile(ND + r"(?:62|4\d|5[1-5]|35)\d{2}(?:[ -]?\d{4}){2}[ -]?\d{4}(?:\d{0,3}|[ -]\d{1,3})" + NA)
MOBILE = re.compile(r"(?<![0-9A-Za-z+])(?<![0-9][ -])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:\d{8}|[ -]\d{4}[ -]\d{4})" + NA)
LANDLINE = re.compile(ND + r"(?:\(0\d{2,3}\)|（0\d{2,3}）|0\d{2,3}[ -])[ ]?[2-9]\d{2,3}[ -]?\d{4}(?:-\d{1,5})?" + NA
                      + r"|" + ND + r"[48]00-\d{3}-\d{4}" + NA)
QQ = re.compile(r"(?:(?<![A-Za-z])(?:QQ|qq|Qq)|扣扣|企鹅号)(?:号码?|群)?\s*[:：是为]?\s*([1-9]\d{4,10})" + NA)
WECHAT = re.compile(r"(?:微信|威信|薇信|(?<![A-Za-z])(?:VX|vx|Vx|WX|wx|Wx|wechat|WeChat)(?![A-Za-z])|加[Vv](?![A-Za-z]))"
                    r"(?:号|账号|ID|id)?\s*[:：是为]?\s*"
                    r"([A-Za-z][-_A-Za-z0-9]{5,19}|1[3-9]\d{9}|[1-9]\d{4,10})" + NA)
# Cheap gate: text without an @, "://", "www." or any run of 5 digits has no PII of these kinds.
GATE = re.compile(r"@|https?:|www\.|\d{5}|\d[ -]\d{4}|\d\.\d{1,3}\.\d|[Qq]{2}|扣扣|企鹅|微信|威信|薇信|[VvWw][Xx]|wechat|WeChat|加[Vv]")

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK = "10X98765432"


def resident_id_valid(s: str) -> bool:
    """GB 11643-1999: the 18th character is ISO 7064 MOD 11-2 of the first 17."""
    if len(s) != 18 or not s[:17].isdigit():
        return False
    return ID_CHECK[sum(int(d) * w for d, w in zip(s[:17], ID_WEIGHTS)) % 11] == s[17].upper()


IP_KEYWORD = re.compile(r"^(?:IP|ip|Ip)")
IP_GATE = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")


def _ip_sub(text: str, counts: Counter, found) -> str:
    """IPv4: after an "IP" keyword always; otherwise only with a 3-digit part (5.64.52.9 is a size in an
    ultrasound report, 1.2.3.4 a section number)."""
    if IP_GATE.search(text) is None:
        return text

    def repl(m: re.Match) -> str:
        whole = m.group()
        keyword = IP_KEYWORD.match(whole) is not None
        addr = re.search(r"[\d.]+$", whole).group()
        if not keyword and not any(len(part) == 3 for part in addr.split(".")):
            return whole
        counts["<IP>"] += 1
        if found is not None:
            found.append(("<IP>", addr))
        return whole[: len(whole) - len(addr)] + "<IP>"
    return IP.sub(repl, text)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _sub(pattern: re.Pattern, placeholder: str, text: str, counts: Counter, found, check=None, group=0) -> str:
    """Replace matches (or their group 1: the id after its keyword, the keyword kept) that pass `check`."""
    def repl(m: re.Match) -> str:
        value = m.group(group)
        if check is not None and not check(value):
            return m.group()
        counts[placeholder] += 1
        if found is not None:
            found.append((placeholder, value))
        return m.group()[: m.start(group) - m.start()] + placeholder
    return pattern.sub(repl, text)


def mask(value: str) -> str:
    """What an audit file may show of a replaced value: its first 3 and last 2 characters."""
    return value[:3] + "*" * max(0, len(value) - 5) + value[-2:] if len(value) > 5 else "*" * len(value)


def scrub(text: str, found: list | None = None) -> tuple[str, Counter]:
    """Text with PII replaced by typed placeholders, and the count of replacements per placeholder. With
    `found`, (placeholder, original value) pairs are appended to it."""
    counts: Counter = Counter()
    if GATE.search(text) is None:
        return text, counts
    if "@" in text:
        text = _sub(EMAIL, "<EMAIL>", text, counts, found)
    if "http" in text or "www." in text.lower():
        text = _sub(URL, "<URL>", text, counts, found)
    text = _ip_sub(text, counts, found)
    text = _sub(ID, "<ID>", text, counts, found, check=resident_id_valid)
    text = _sub(CARD, "<CARD>", text, counts, found, check=lambda s: luhn_valid(re.sub(r"[ -]", "", s)))
    text = _sub(QQ, "<QQ>", text, counts, found, group=1)
    text = _sub(WECHAT, "<WECHAT>", text, counts, found, group=1)
    text = _sub(MOBILE, "<PHONE>", text, counts, found)
    text = _sub(LANDLINE, "<PHONE>", text, counts, found)
    return text, counts
