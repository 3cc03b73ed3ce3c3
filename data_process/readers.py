"""One streaming reader per upstream corpus format (the table in DESIGN.md), plus the odd variants real files have.

A reader is `read(path, src, span=None) -> Iterator[dict | Reject]`: it streams one file (never loading it
whole: JSON arrays are parsed incrementally with ijson's C backend) and yields, per upstream record, either
records in the CONTRACTS.md format without "corpus" (the pipeline stamps it) or a `Reject` naming the file,
line/item/offset and reason. `src` is the file's name relative to the project root and prefixes the record ids.
`span=(start, end, first_line)` restricts a line-based, uncompressed file to a byte range that starts at a line
boundary, so one big JSONL file is read by several processes (`LINE_READERS` says which readers allow this).

Compression is by file name: `.gz` (gzip) and `.zst` (zstandard); a truncated compressed file yields the records
before the cut and one "truncated" reject. The registry `READERS` maps the recipe's `reader` names to functions.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import ijson
import orjson
import zstandard

from data_process.records import ZstdReader

try:  # the C backend is ~10x faster than pure Python; fall back where the wheel lacks it
    IJSON = ijson.get_backend("yajl2_c")
except ImportError:  # pragma: no cover
    IJSON = ijson

READ_BLOCK = 1 << 20


@dataclass
class Reject:
    reason: str                       # bad_json, bad_utf8, bad_encoding, missing_field, wrong_type, empty, truncated, ...
    where: dict = field(default_factory=dict)   # {"line": n} | {"item": i} | {"offset": byte} | {"row": i}
    detail: str = ""


class BadRecord(Exception):
    """Raised by a converter for one malformed upstream record; becomes a Reject."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- opening files


def open_binary(path: Path):
    """A buffered binary stream of the file's decompressed bytes (by extension: .gz, .zst, else raw)."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst") or name.endswith(".zstd"):
        return io.BufferedReader(ZstdReader(open(path, "rb")), READ_BLOCK)
    return open(path, "rb", buffering=READ_BLOCK)


def is_compressed(path: Path) -> bool:
    return path.name.endswith((".gz", ".zst", ".zstd"))


DECOMPRESS_ERRORS = (EOFError, zstandard.ZstdError, gzip.BadGzipFile, OSError)


UTF8_BOM = b"\xef\xbb\xbf"


def iter_lines(path: Path, span=None, strip_bom: bool = True) -> Iterator[tuple[int, bytes] | Reject]:
    """(line number, raw line bytes) for each line; a last line without a newline is still a line.
    A UTF-8 byte-order mark at the start of the file (real dumps have them) is not part of the first line; only
    the span that starts at byte 0 can hold it."""
    lineno = 0
    try:
        with open_binary(path) as f:
            if span is None:
                for lineno, line in enumerate(f, 1):
                    yield lineno, (line[3:] if strip_bom and lineno == 1 and line.startswith(UTF8_BOM) else line)
            else:
                start, end, first_line = span
                f.seek(start)
                pos, lineno = start, first_line - 1
                for line in f:
                    if pos >= end:
                        break
                    lineno += 1
                    at_start = pos == 0
                    pos += len(line)
                    yield lineno, (line[3:] if strip_bom and at_start and line.startswith(UTF8_BOM) else line)
    except DECOMPRESS_ERRORS as e:
        yield Reject("truncated", {"line": lineno + 1}, f"{type(e).__name__}: {e}")


def sniff_json_array(path: Path) -> bool:
    """True when the (decompressed) file is one JSON array, False for JSONL.

    It is an array when it starts with '[' and its first line is not a complete JSON value followed by more
    lines (a pretty-printed array starts with a lone "[", WuDao's are a single line); a JSONL file whose
    first record happens to be a list stays JSONL, so one bad line cannot turn the whole file unreadable."""
    try:
        with open_binary(path) as f:
            head = f.read(1 << 16)
    except DECOMPRESS_ERRORS:
        return False
    head = head.removeprefix(UTF8_BOM).lstrip(b" \t\r\n")
    if head[:1] != b"[":
        return False
    first, newline, rest = head.partition(b"\n")
    if not newline or not rest.strip():
        return True
    try:
        orjson.loads(first)
    except orjson.JSONDecodeError:
        return True
    return False


BLANK = object()


def _loads_line(line: bytes, lineno: int):
    """Parse one JSONL line -> value, BLANK for a blank line, or a Reject."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as e:
        if not line.strip():
            return BLANK
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as u:
            return Reject("bad_utf8", {"line": lineno}, f"{u}")
        return Reject("bad_json", {"line": lineno}, f"{e}; {line[:120].decode('utf-8', 'replace')}")


def iter_json_objects(path: Path, span=None) -> Iterator[tuple[dict, object] | Reject]:
    """(where, parsed value) for each item of a JSON array file or each line of a JSONL file."""
    if span is None and sniff_json_array(path):
        yield from _iter_json_array(path)
        return
    for item in iter_lines(path, span):
        if isinstance(item, Reject):
            yield item
            continue
        lineno, line = item
        value = _loads_line(line, lineno)
        if value is BLANK:
            continue  # blank lines are not records (a JSON null is, and is rejected as wrong_type)
        if isinstance(value, Reject):
            yield value
        else:
            yield {"line": lineno}, value


class _SkipBom:
    """A binary stream without the UTF-8 byte-order mark it may start with (ijson rejects a BOM, which would lose
    the whole array); only read() is needed by ijson."""

    def __init__(self, f):
        self.f = f
        head = f.read(3)
        self.head = b"" if head == UTF8_BOM else head

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        head, self.head = self.head, b""
        if n is None or n < 0:
            return head + self.f.read()
        if n <= len(head):
            self.head = head[n:]
            return head[:n]
        return head + self.f.read(n - len(head))


def _iter_json_array(path: Path):
    index = -1
    try:
        with open_binary(path) as f:
            for index, value in enumerate(IJSON.items(_SkipBom(f), "item", use_float=True)):
                yield {"item": index}, value
    except DECOMPRESS_ERRORS as e:
        yield Reject("truncated", {"item": index + 1}, f"{type(e).__name__}: {e}")
    except ijson.JSONError as e:
        # A syntax error inside a JSON array cannot be skipped: everything after it is lost, counted once.
        reason = "truncated" if "premature EOF" in str(e) else "bad_json"
        if "UTF8" in str(e):
            reason = "bad_utf8"
        yield Reject(reason, {"item": index + 1}, f"rest of the array unreadable: {str(e)[:200]}")


# ---------------------------------------------------------------- field helpers


def _obj(value) -> dict:
    if not isinstance(value, dict):
        raise BadRecord("wrong_type", f"expected a JSON object, got {type(value).__name__}")
    return value


def _str(obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"no {key!r}")
        return ""
    if not isinstance(value, str):   # a number, bool, list or object where text belongs is not text
        raise BadRecord("wrong_type", f"{key!r} is {_shape(value)}, not a string")
    return value


def _shape(value) -> str:
    """A short description of a JSON value's type, for reject details ("a message dict {from, value}")."""
    if isinstance(value, dict):
        keys = ", ".join(list(map(str, value))[:6]) + (", ..." if len(value) > 6 else "")
        if {"from", "value"} <= set(value) or {"role", "content"} <= set(value):
            return f"a message dict {{{keys}}}"
        return f"a dict {{{keys}}}"
    if isinstance(value, list):
        inner = f" of {type(value[0]).__name__}" if value else ""
        return f"a list{inner}"
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return type(value).__name__


def _first_key(obj: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in obj:
            return key
    raise BadRecord("missing_field", f"none of {keys}")


ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
              "bot": "assistant", "model": "assistant"}


def _messages(value, where: str) -> list[dict]:
    """Normalize a message list ({role, content} or ShareGPT {from, value}) to [{role, content}]."""
    if not isinstance(value, list):
        raise BadRecord("wrong_type" if value is not None else "missing_field", f"{where} is not a list")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"{where}: a message is {type(m).__name__}")
        role_key = "role" if "role" in m else "from"
        text_key = "content" if "content" in m else "value"
        if m.get(role_key) is not None and not isinstance(m.get(role_key), str):
            raise BadRecord("wrong_type", f"{where}: a role is {_shape(m.get(role_key))}, not a string")
        role = ROLE_NAMES.get(str(m.get(role_key, "")).lower())
        if role is None:
            raise BadRecord("bad_roles", f"{where}: unknown role {m.get(role_key)!r}")
        out.append({"role": role, "content": _str(m, text_key)})
    return out


def conversation_prefix(messages: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Optional system, then user/assistant alternating, ending with assistant: the valid prefix of `messages` and
    the turns cut after it by reason. A turn that breaks the alternation ends the conversation after the complete
    pairs before it ("bad_roles"); a trailing user turn has no answer and is dropped ("trailing_user"). BadRecord
    when no complete pair is left."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    cut: dict[str, int] = {}
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            keep = i - i % 2
            if keep == 0 and not any(t["role"] == "assistant" for t in body):
                raise BadRecord("no_answer", "no assistant turn")
            if keep == 0:
                raise BadRecord("bad_roles", f"turn {i} is {m['role']}")
            cut["bad_roles"], body = len(body) - keep, body[:keep]
            break
    if body and body[-1]["role"] == "user":
        cut["trailing_user"], body = 1, body[:-1]
    if not body:
        raise BadRecord("no_answer", "no assistant turn")
    return system + body, cut


def check_conversation(messages: list[dict]) -> list[dict]:
    """The valid prefix of a conversation (conversation_prefix), without the counts."""
    return conversation_prefix(messages)[0]


ZERO_WIDTH = re.compile("[\u200b-\u200d\u2060\ufeff]")


def is_blank(text: str) -> bool:
    """Empty, whitespace or zero-width characters only (a reply that is one U+200B is no reply)."""
    return not ZERO_WIDTH.sub("", text).strip()


def valid_prefix(messages: list[dict]) -> tuple[list[dict], int]:
    """The part of a user/assistant-alternating conversation worth keeping: the optional system message, then the
    pairs up to the first blank turn (is_blank); returns (kept messages, turns cut after them). No pair is kept
    when the first user or assistant turn is blank: the caller rejects that conversation."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    n = 0
    while n + 1 < len(body) and not is_blank(body[n]["content"]) and not is_blank(body[n + 1]["content"]):
        n += 2
    if system and is_blank(system[0]["content"]):
        system = []
    return system + body[:n], len(body) - n


def _prompt(messages: list[dict]) -> list[dict]:
    """A preference prompt: optional system, alternating turns, ending with a user turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "user":
        raise BadRecord("bad_roles", "prompt does not end with a user turn")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("bad_roles", f"prompt turn {i} is {m['role']}")
    return messages


def doc(text: str, title: str | None = None) -> dict:
    record = {"kind": "doc", "text": text}
    if title:
        record["title"] = title
    return record


def conv(messages: list[dict]) -> dict:
    """A conversation record; "cut" ({reason: turns}) says what conversation_prefix dropped, for the cleaner to
    count (Cleaner.clean removes the key)."""
    kept, cut = conversation_prefix(messages)
    return {"kind": "conv", "messages": kept, **({"cut": cut} if cut else {})}


def pref(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"kind": "pref", "prompt": _prompt(prompt), "chosen": chosen, "rejected": rejected}


def pref_from_message_lists(chosen_msgs, rejected_msgs) -> dict:
    """UltraFeedback / MagpieLM / MiniMind: chosen and rejected are whole conversations sharing a prompt."""
    chosen = _messages(chosen_msgs, "chosen")
    rejected = _messages(rejected_msgs, "rejected")
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise BadRecord("bad_roles", "chosen/rejected must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("prompt_mismatch", "chosen and rejected do not share the same prompt turns")
    return pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


# ---------------------------------------------------------------- converters: one upstream record -> record(s)


def convert_text(o) -> dict:
    """C4_zh, SkyPile, shibing624/medical pretrain, Firefly pretrain: {"text", ...}."""
    return doc(_str(_obj(o), "text"))


def convert_wiki(o) -> dict:
    """pleisto/wikipedia-cn: {"completion", "source"}."""
    return doc(_str(_obj(o), "completion"))


def convert_baidubaike(o) -> dict:
    """563w_baidubaike: title + summary (may be missing/null) + every section's title and content."""
    o = _obj(o)
    title = _str(o, "title", required=False).strip()
    parts = [title] if title else []
    summary = _str(o, "summary", required=False).strip()
    if summary:
        parts.append(summary)
    sections = o.get("sections")
    if sections is None:
        sections = []
    if not isinstance(sections, list):
        raise BadRecord("wrong_type", f"'sections' is {_shape(sections)}, not a list")
    for s in sections:
        if not isinstance(s, dict):
            raise BadRecord("wrong_type", "a section is not an object")
        s_title = _str(s, "title", required=False).strip()
        s_content = _str(s, "content", required=False).strip()
        if s_title and s_title != title:
            parts.append(s_title)
        if s_content:
            parts.append(s_content)
    if not title and not summary and not sections:
        raise BadRecord("missing_field", "no title, summary or sections")
    return doc("\n".join(parts), title)


def convert_wudao(o) -> dict:
    """WuDaoCorpora: {"id", "uniqueKey", "titleUkey", "dataType", "title", "content"}."""
    o = _obj(o)
    title = _str(o, "title", required=False).strip()
    content = _str(o, "content")
    return doc(f"{title}\n{content}" if title and not content.startswith(title) else content, title)


def convert_guidelines(o) -> dict:
    """epfl-llm/guidelines: {"id", "source", "title", "clean_text", "raw_text", "url", "overview"}; the text is
    clean_text, title kept. raw_text is never used: it is the page as scraped (HTML fragments), and an empty
    clean_text means the upstream cleaner found no text, so the record is an "empty" reject."""
    o = _obj(o)
    text = _str(o, "clean_text")
    if not text.strip():
        raise BadRecord("empty", "empty clean_text (raw_text is not used: it is uncleaned HTML)")
    return doc(text, _str(o, "title", required=False))


SEGMENT = re.compile(r"<s>(.*?)</s>", re.S)


def convert_minimind_pretrain(o) -> list[dict]:
    """MiniMind pretrain_hq: each <s>...</s> segment is a document (no markers: the whole text is one)."""
    text = _str(_obj(o), "text")
    segments = SEGMENT.findall(text) if "<s>" in text else [text]
    return [doc(s) for s in segments]


def _instruction_user(o: dict) -> str:
    instruction = _str(o, "instruction")
    extra = _str(o, "input", required=False).strip()
    return f"{instruction}\n{extra}" if extra else instruction


def convert_instruction(o) -> dict:
    """alpaca / Belle / shibing624/medical finetune: {"instruction", "input", "output"} (+ optional "system")."""
    o = _obj(o)
    messages = [{"role": "user", "content": _instruction_user(o)},
                {"role": "assistant", "content": _str(o, "output")}]
    system = _str(o, "system", required=False)
    return conv(([{"role": "system", "content": system}] if system else []) + messages)


def convert_conversations(o) -> dict:
    """MiniMind SFT/r1 ({role, content}) and ShareGPT ({from, value}): {"conversations": [...]}.
    r1 answers keep their literal <think>...</think><answer>...</answer>."""
    return conv(_messages(_obj(o).get("conversations"), "conversations"))


def convert_openai_tools(o) -> dict:
    """OpenAI chat layout with tool calls: {"messages": [... assistant "tool_calls", "tool" results ...],
    "tools": [function schemas]} -> our turns, written by the chat template's one converter
    (tokenizer.openai_to_chat: tools in the system turn, <tool_call> blocks, <tool_response> user turns)."""
    from tokenizer import openai_to_chat
    o = _obj(o)
    messages, tools = o.get("messages"), o.get("tools")
    if messages is None:
        raise BadRecord("missing_field", "no messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages) or \
            not isinstance(tools, (list, type(None))):
        raise BadRecord("wrong_type", "messages must be a list of objects and tools a list")
    try:
        return conv(openai_to_chat(messages, tools))
    except (ValueError, KeyError, TypeError) as e:   # unknown role, arguments that are not JSON, a call without name
        raise BadRecord("bad_record", f"tool conversation: {type(e).__name__}: {e}") from None


QUESTION_KEYS = ("问", "question", "prompt", "query", "instruction")
ANSWER_KEYS = ("答", "answer", "response", "output")


def convert_qa(o) -> dict:
    """MedicalGPT rag {"问","答"}, ChatLM parquet {prompt, response}, and the like."""
    o = _obj(o)
    q, a = _first_key(o, QUESTION_KEYS), _first_key(o, ANSWER_KEYS)
    return conv([{"role": "user", "content": _str(o, q)}, {"role": "assistant", "content": _str(o, a)}])


def convert_medical_reward(o) -> dict:
    """shibing624/medical reward: {"question", "response_chosen", "response_rejected"}."""
    o = _obj(o)
    return pref([{"role": "user", "content": _str(o, "question")}],
                _str(o, "response_chosen"), _str(o, "response_rejected"))


def convert_pref_messages(o) -> dict:
    """MiniMind dpo {"chosen":[msgs],"rejected":[msgs]}; Firefly/UltraFeedback also carry "prompt" (redundant)."""
    o = _obj(o)
    if "chosen" not in o or "rejected" not in o:
        raise BadRecord("missing_field", "chosen/rejected")
    return pref_from_message_lists(o["chosen"], o["rejected"])


def convert_sharegpt_pref(o) -> dict:
    """MedicalGPT dpo_zh_500: {"conversations": [{from, value}] ending with human, "chosen": str, "rejected": str}."""
    o = _obj(o)
    prompt = _messages(o.get("conversations"), "conversations")
    return pref(prompt, _str(o, "chosen"), _str(o, "rejected"))


def _reply(o: dict, key: str) -> str:
    """The text of a single assistant message {from: gpt, value} (or {role, content}) held under `key`."""
    m = o.get(key)
    if m is None:
        raise BadRecord("missing_field", f"no {key!r}")
    if not isinstance(m, dict):
        raise BadRecord("wrong_type", f"{key!r} is {_shape(m)}, not one message dict {{from, value}}")
    [message] = _messages([m], key)
    if message["role"] != "assistant":
        raise BadRecord("bad_roles", f"{key!r} is a {message['role']} message, not the assistant's")
    return message["content"]


def convert_sharegpt_pref_msg(o) -> dict:
    """LLaMA-Factory dpo_zh_demo / dpo_en_demo (its ShareGPT "ranking" layout, a JSON array): {"conversations":
    [{from, value}] ending with a human turn (a system turn may come first), "chosen": {from: gpt, value},
    "rejected": {from: gpt, value}}."""
    o = _obj(o)
    prompt = _messages(o.get("conversations"), "conversations")
    return pref(prompt, _reply(o, "chosen"), _reply(o, "rejected"))


def convert_human_assistant(o) -> dict:
    """MOSS-003-sft / Firefly (yangjianxin1/Firefly data/dummy_data.jsonl): {"conversation_id", "category",
    "conversation": [{"human", "assistant"}, ...], "dataset"}, an optional top-level "system"."""
    o = _obj(o)
    turns = o.get("conversation")
    if turns is None:
        raise BadRecord("missing_field", "no 'conversation'")
    if not isinstance(turns, list):
        raise BadRecord("wrong_type", f"'conversation' is {_shape(turns)}, not a list of {{human, assistant}}")
    system = _str(o, "system", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"a turn of 'conversation' is {_shape(turn)}, not {{human, assistant}}")
        messages.append({"role": "user", "content": _str(turn, "human")})
        messages.append({"role": "assistant", "content": _str(turn, "assistant")})
    return conv(messages)


def convert_magpie(o) -> dict:
    """MagpieLM-DPO parquet row: uuid, instruction, chosen/rejected lists of {content, role}."""
    o = _obj(o)
    if o.get("chosen") is None or o.get("rejected") is None:
        raise BadRecord("missing_field", "chosen/rejected")
    return pref_from_message_lists(o["chosen"], o["rejected"])


# ---------------------------------------------------------------- readers: file -> records


def _emit(src: str, where: dict, converted) -> Iterator[dict]:
    key = next(iter(where.values()))
    if isinstance(converted, list):
        for k, record in enumerate(converted):
            yield {"id": f"{src}:{key}.{k}" if len(converted) > 1 else f"{src}:{key}", **record}
    else:
        yield {"id": f"{src}:{key}", **converted}


UNEXPECTED = (TypeError, ValueError, AttributeError, KeyError, IndexError)


def json_reader(convert: Callable) -> Callable:
    """A reader for JSONL or JSON-array files whose items `convert` turns into record(s)."""

    def read(path: Path, src: str, span=None) -> Iterator[dict | Reject]:
        for item in iter_json_objects(path, span):
            if isinstance(item, Reject):
                yield item
                continue
            where, value = item
            try:
                converted = convert(value)
            except BadRecord as e:
                yield Reject(e.reason, where, e.detail)
                continue
            except UNEXPECTED as e:  # a shape no converter anticipated: still one counted reject, not a crash
                yield Reject("bad_record", where, f"{type(e).__name__}: {e}")
                continue
            if isinstance(converted, list) and not converted:
                yield Reject("empty", where, "no segments")
                continue
            yield from _emit(src, where, converted)

    read.__doc__ = convert.__doc__
    read.convert, read.kind = convert, "json"
    return read


def check_encoding(encoding: str) -> str:
    """The codec name for a text reader's `encoding` setting; ValueError for an unknown codec or one whose lines
    cannot be split on the newline byte (UTF-16/32). "utf-8-sig" is "utf-8": a leading BOM is always dropped."""
    import codecs

    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (Python codec names: utf-8, gb18030, gbk, big5, ...)") \
            from None
    if name == "utf-8-sig":
        return "utf-8"
    if "a,\n".encode(name) != b"a,\n":
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible: convert the file first "
                         f"(iconv -f {encoding} -t utf-8)")
    return name


def gb18030_or_utf8(path: Path, head_bytes: int = 1 << 16) -> str:
    """The Toyhom readers' default encoding: GB18030 (the upstream files), but UTF-8 when the file's first 64 KB
    hold non-ASCII text that is valid UTF-8 (re-exports such as shibing624/medical's are). Decoding UTF-8 Chinese
    as GB18030 does not always fail: some lines come out as plausible-looking garbage, so guessing is safer than
    trusting the default. GB18030 Chinese text is practically never valid UTF-8."""
    head = _head_lines(path, head_bytes)
    return "utf-8" if not head.isascii() and "utf-8" in _decoding(head) else "gb18030"


def _head_lines(path: Path, head_bytes: int) -> bytes:
    """The file's first complete lines in about `head_bytes` (decompressed, without a BOM); b"" if unreadable."""
    try:
        with open_binary(path) as f:
            head = f.read(head_bytes).removeprefix(UTF8_BOM)
    except DECOMPRESS_ERRORS:
        return b""
    return head[:head.rfind(b"\n") + 1] if len(head) >= head_bytes - 3 else head


def _decoding(data: bytes) -> list[str]:
    """Which of UTF-8 and GB18030 decode `data`."""
    fits = []
    for encoding in ("utf-8", "gb18030"):
        try:
            data.decode(encoding)
            fits.append(encoding)
        except UnicodeDecodeError:
            pass
    return fits


def _starts_with_bom(path: Path) -> bool:
    with open_binary(path) as f:
        return f.read(3) == UTF8_BOM


def iter_text_lines(path: Path, span=None, encoding: str = "utf-8") -> Iterator[tuple[int, str] | Reject]:
    """(line number, decoded line without its line break) for each line of a text file in `encoding`; an
    undecodable line is a bad_utf8 / bad_encoding reject. A byte-order mark at the start is dropped, and a UTF-8
    one means the file is UTF-8 whatever `encoding` says (the mark is that file's own statement)."""
    encoding = check_encoding(encoding)
    reason = "bad_utf8" if encoding == "utf-8" else "bad_encoding"
    at_start = span is None or span[0] == 0
    if encoding != "utf-8" and span is not None and not at_start and _starts_with_bom(path):
        encoding, reason = "utf-8", "bad_utf8"
    for item in iter_lines(path, span, strip_bom=False):
        if isinstance(item, Reject):
            yield item
            continue
        lineno, raw = item
        if at_start:
            at_start = False
            if raw.startswith(UTF8_BOM):
                raw, encoding, reason = raw[3:], "utf-8", "bad_utf8"
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError as e:
            yield Reject(reason, {"line": lineno}, f"{encoding}: {e}")
            continue
        yield lineno, line.rstrip("\r\n").lstrip("\ufeff") if lineno == 1 else line.rstrip("\r\n")


def read_plain_text(path: Path, src: str, span=None, max_doc_chars: int = 2000,
                    encoding: str = "utf-8") -> Iterator[dict | Reject]:
    """Books: one paragraph per line (UTF-8 unless the corpus sets `encoding`). Consecutive lines are grouped into
    documents of about `max_doc_chars` (a blank line also ends a document), so headings stay with their
    paragraphs; id = first line number."""
    buf: list[str] = []
    size, first = 0, 0
    for item in iter_text_lines(path, span, encoding):
        if isinstance(item, Reject):
            yield item
            continue
        lineno, line = item
        line = line.strip()
        if not line:
            if buf:
                yield {"id": f"{src}:{first}", **doc("\n".join(buf))}
                buf, size = [], 0
            continue
        if not buf:
            first = lineno
        buf.append(line)
        size += len(line)
        if size >= max_doc_chars:
            yield {"id": f"{src}:{first}", **doc("\n".join(buf))}
            buf, size = [], 0
    if buf:
        yield {"id": f"{src}:{first}", **doc("\n".join(buf))}


def _dialogue(title: str, ask: str, answer: str) -> dict:
    """A Toyhom dialogue: the title is the question's headline, kept unless the ask already starts with it."""
    user = ask if not title or ask.startswith(title) else f"{title}\n{ask}"
    return conv([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])


def read_medical_dialogue_txt(path: Path, src: str, span=None, encoding: str | None = None) -> Iterator[dict | Reject]:
    """Toyhom Chinese-medical-dialogue-data department .txt (Data_数据/IM_内科/内科.txt, written from the CSVs by the
    repository's 数据处理.py as `title + ',' + ask + '\\n' + answer + '\\n\\n\\n'`): GB18030 (or UTF-8, see
    gb18030_or_utf8) unless the corpus sets `encoding`; one dialogue per block of two lines, a "title,ask" line and
    the answer line, blocks separated by blank lines. id = the block's first line."""
    encoding = encoding or gb18030_or_utf8(path)
    block: list[str] = []
    first, bad = 0, None

    def finish():
        where = {"line": first}
        if bad is not None:
            return Reject(bad.reason, where, f"line {bad.where['line']}: {bad.detail}")
        if len(block) != 2:
            return Reject("bad_block", where, f"{len(block)} line(s), expected 2 (a 'title,ask' line, then the "
                                              f"answer): {' | '.join(block)[:120]}")
        title, comma, ask = block[0].partition(",")
        if not comma:
            title, ask = "", block[0]
        try:
            return {"id": f"{src}:{first}", **_dialogue(title.strip(), ask.strip(), block[1])}
        except BadRecord as e:
            return Reject(e.reason, where, e.detail)

    for item in iter_text_lines(path, span, encoding):
        if isinstance(item, Reject) and item.reason == "truncated":
            if block or bad is not None:
                yield finish()
                block, bad = [], None
            yield item
            continue
        if isinstance(item, Reject):   # an undecodable line spoils its block: one reject for the block
            if not block and bad is None:
                first = item.where["line"]
            bad = bad or item
            continue
        lineno, line = item
        line = line.strip()
        if not line:
            if block or bad is not None:
                yield finish()
                block, bad = [], None
            continue
        if not block and bad is None:
            first = lineno
        block.append(line)
    if block or bad is not None:
        yield finish()


class _GbLines:
    """Feeds csv.reader decoded lines, remembering which physical lines held undecodable bytes."""

    def __init__(self, f, encoding: str):
        self.f, self.encoding, self.lineno, self.bad = f, encoding, 0, []

    def __iter__(self):
        for raw in self.f:
            self.lineno += 1
            if self.lineno == 1 and raw.startswith(UTF8_BOM):   # a UTF-8 mark: the file is UTF-8 (see iter_text_lines)
                raw, self.encoding = raw[3:], "utf-8"
            try:
                yield raw.decode(self.encoding)
            except UnicodeDecodeError:
                self.bad.append(self.lineno)
                yield raw.decode(self.encoding, "replace")


def read_medical_dialogue_csv(path: Path, src: str, span=None, encoding: str | None = None) -> Iterator[dict | Reject]:
    """Toyhom Chinese-medical-dialogue-data: GB18030 (not gb2312: real files use GBK-only characters),
    header department,title,ask,answer; quoted fields may span lines. id = first physical line of the row.
    The corpus may set another `encoding` (default: gb18030_or_utf8); a leading byte-order mark is dropped (a UTF-8
    one means UTF-8)."""
    lines = _GbLines(None, check_encoding(encoding or gb18030_or_utf8(path)))
    try:
        with open_binary(path) as f:
            lines.f = f
            rows = csv.reader(iter(lines))
            header = next(rows, None)
            if header is None:
                return
            header = [h.strip().lstrip("\ufeff") for h in header]
            missing = [k for k in ("title", "ask", "answer") if k not in header]
            if missing:
                yield Reject("missing_field", {"line": 1}, f"header lacks {missing}: {header}")
                return
            col = {k: header.index(k) for k in ("title", "ask", "answer")}
            row_start = lines.lineno + 1
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except csv.Error as e:
                    yield Reject("bad_csv", {"line": row_start}, str(e))
                    row_start = lines.lineno + 1
                    continue
                where = {"line": row_start}
                bad = [n for n in lines.bad if n >= row_start]
                row_start = lines.lineno + 1
                if bad:
                    lines.bad.clear()
                    yield Reject("bad_encoding", where, f"undecodable {lines.encoding} bytes on line(s) {bad}")
                    continue
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    yield Reject("bad_row", where, f"{len(row)} fields, header has {len(header)}")
                    continue
                title, ask, answer = (row[col[k]].strip() for k in ("title", "ask", "answer"))
                try:
                    record = _dialogue(title, ask, answer)
                except BadRecord as e:
                    yield Reject(e.reason, where, e.detail)
                    continue
                yield {"id": f"{src}:{where['line']}", **record}
    except DECOMPRESS_ERRORS as e:
        yield Reject("truncated", {"line": lines.lineno + 1}, f"{type(e).__name__}: {e}")


def parquet_reader(convert: Callable, batch_rows: int = 1024) -> Callable:
    """A reader for parquet files, streamed one record batch at a time; id = row index."""

    def read(path: Path, src: str, span=None) -> Iterator[dict | Reject]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_rows):
                for value in batch.to_pylist():
                    where = {"row": row}
                    row += 1
                    try:
                        converted = convert(value)
                    except BadRecord as e:
                        yield Reject(e.reason, where, e.detail)
                        continue
                    except UNEXPECTED as e:
                        yield Reject("bad_record", where, f"{type(e).__name__}: {e}")
                        continue
                    yield from _emit(src, where, converted)
        except (pa.ArrowException, OSError) as e:
            yield Reject("bad_parquet", {"row": row}, f"{type(e).__name__}: {str(e)[:200]}")

    read.__doc__ = convert.__doc__
    read.convert, read.kind = convert, "parquet"
    return read


READERS: dict[str, Callable] = {
    "text_jsonl": json_reader(convert_text),
    "wiki_json_array": json_reader(convert_wiki),
    "baidubaike_jsonl": json_reader(convert_baidubaike),
    "wudao_json_array": json_reader(convert_wudao),
    "guidelines_jsonl": json_reader(convert_guidelines),
    "minimind_pretrain_jsonl": json_reader(convert_minimind_pretrain),
    "plain_text": read_plain_text,
    "instruction_json": json_reader(convert_instruction),
    "sharegpt_jsonl": json_reader(convert_conversations),
    "minimind_sft_jsonl": json_reader(convert_conversations),
    "qa_jsonl": json_reader(convert_qa),
    "qa_parquet": parquet_reader(convert_qa),
    "medical_dialogue_csv": read_medical_dialogue_csv,
    "medical_reward_jsonl": json_reader(convert_medical_reward),
    "pref_messages_jsonl": json_reader(convert_pref_messages),
    "sharegpt_pref_jsonl": json_reader(convert_sharegpt_pref),
    "sharegpt_pref_msg": json_reader(convert_sharegpt_pref_msg),
    "moss_firefly_jsonl": json_reader(convert_human_assistant),
    "medical_dialogue_txt": read_medical_dialogue_txt,
    "magpie_parquet": parquet_reader(convert_magpie),
    "openai_tools_jsonl": json_reader(convert_openai_tools),
}
# Readers that decode text themselves and so take the corpus's `encoding` setting (JSON is UTF-8 by its RFC 8259).
# Defaults: plain_text UTF-8, the Toyhom readers gb18030_or_utf8.
ENCODING_READERS = {"plain_text", "medical_dialogue_csv", "medical_dialogue_txt"}

# Readers that may split one uncompressed file into byte ranges at line boundaries (JSONL and plain text).
# JSON arrays, CSV (quoted fields span lines), parquet and compressed files are read whole by one process.
LINE_READERS = {"text_jsonl", "baidubaike_jsonl", "guidelines_jsonl", "minimind_pretrain_jsonl", "plain_text",
                "instruction_json", "sharegpt_jsonl", "minimind_sft_jsonl", "qa_jsonl", "medical_reward_jsonl",
                "pref_messages_jsonl", "sharegpt_pref_jsonl", "wiki_json_array", "wudao_json_array",
                "sharegpt_pref_msg", "moss_firefly_jsonl", "openai_tools_jsonl"}


def splittable(reader: str, path: Path) -> bool:
    """Whether `path` may be read in byte ranges (a line-based reader, uncompressed, and not a JSON array)."""
    if reader not in LINE_READERS or is_compressed(path):
        return False
    return reader == "plain_text" or not sniff_json_array(path)


# ---------------------------------------------------------------- a file whose every record was rejected


def _describe(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in list(value.items())[:8]) + "}"
    return _shape(value)


def _sample(path: Path, kind: str, n: int) -> list:
    """The first `n` parsed items of a JSON/JSONL (kind "json") or parquet file; [] when it holds none."""
    values = []
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=n):
                return batch.to_pylist()[:n]
            return []
        items = iter_json_objects(path)
        for item in items:
            if not isinstance(item, Reject):
                values.append(item[1])
            if len(values) >= n:
                break
        items.close()
    except Exception:  # noqa: BLE001 - a hint is best effort; the rejects themselves are already counted
        return values
    return values


def _converts(convert: Callable, value) -> bool:
    try:
        convert(value)
    except (BadRecord, *UNEXPECTED):
        return False
    return True


def explain_all_rejected(reader: str, path: Path, src: str, rejected: dict, first: Reject | None,
                         sample: int = 20) -> str:
    """The message for a file of which `reader` rejected every record: what the reader expects, what the first
    reject said, what the records look like, and which readers do read them (tried on the first `sample`)."""
    read_fn = READERS[reader]
    total = sum(rejected.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
    parts = [f"{src}: reader {reader!r} rejected every record ({total}: {reasons})"]
    if first is not None:
        where = ", ".join(f"{k} {v}" for k, v in first.where.items())
        parts.append(f"first ({where}): {first.reason}: {first.detail[:160]}")
    parts.append(f"{reader} expects " + " ".join((read_fn.__doc__ or "").split())[:240].rstrip("."))
    kind = "parquet" if path.name.endswith(".parquet") else "json"
    if 2 * (rejected.get("bad_encoding", 0) + rejected.get("bad_utf8", 0)) > total:   # mostly undecodable
        fits = _decoding(_head_lines(path, 1 << 16))
        if fits and reader in ENCODING_READERS:
            parts.append(f"the text decodes as {' and '.join(fits)}: set encoding = {fits[0]!r} on the corpus")
        elif fits and "utf-8" not in fits:
            parts.append(f"the text decodes as {' and '.join(fits)}, not UTF-8: JSON must be UTF-8 (iconv -f "
                         f"{fits[0]} -t utf-8)")
    values = _sample(path, kind, sample)
    if values:
        parts.append(f"the records here look like {_describe(values[0])}"[:300])
        fit = [name for name, fn in READERS.items() if name != reader and getattr(fn, "kind", None) == kind
               and all(_converts(fn.convert, v) for v in values)]
        parts.append(f"use reader {' or '.join(fit)}" if fit else
                     "no reader reads them as they are: convert the file or add a reader (data_process/readers.py)")
    elif kind == "json" and getattr(read_fn, "kind", None) == "json":
        parts.append("the file holds no JSON records: for text use reader plain_text (books), medical_dialogue_txt "
                     "or medical_dialogue_csv (Toyhom)")
    return "; ".join(parts)
