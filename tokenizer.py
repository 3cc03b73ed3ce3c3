"""The tokenizer: a SentencePiece model, its special tokens, and the ONE chat template of the project.
(Training a model is the pipeline's tokenizer step: data_process/train_tokenizer.py.)

Everything that turns text into ids goes through `Tokenizer`: the tokenize step (pretraining shards),
SFT/DPO staging and training, eval, chat, serve and export. It owns:

- loading a trained or an existing SentencePiece model (`Tokenizer.load(dir_or_model)`), adding the special
  pieces the chat template needs if the model lacks them (edits the ModelProto, see `prepare_model`);
- the chat template (`render_chat` -> ids + loss weights, `render_text` / `CHAT_TEMPLATE_JINJA` for export);
- `StreamDecoder`, which turns a stream of ids into text without ever splitting a UTF-8 character.

Special tokens are SentencePiece CONTROL pieces: SentencePiece never produces a control piece from input text,
so `encode()` of a user's literal "<|im_end|>" stays ordinary text (no prompt injection); only `render_chat`
(and `encode(text, allow_special=True)`, for trusted template text) place them.

Chat format (ChatML without the newline between turns, https://github.com/openai/openai-python/blob/v0.28.1/chatml.md):
    <|im_start|>system\n{system}<|im_end|><|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n{answer}<|im_end|>
Reasoning answers are `<think>…</think><answer>…</answer>` inside the assistant content; inside assistant turns
the four tags become their single special tokens. The thinking switch (`enable_thinking`, as Qwen3's template
names it) acts on the generation prompt only: True appends `<think>` (the reply starts by reasoning), False appends
`<think></think>` (an empty reasoning: the reply answers at once), None (the default) leaves it to the model.

Tool calls (`openai_to_chat`, the one place that writes them; Qwen2.5/Hermes's text layout, so their parsers
read ours): the tools' JSON schemas go into the system turn inside <tools></tools>; an assistant's call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in its content; tool results become the next user
turn as `<tool_response>\n...\n</tool_response>` blocks. So a tool conversation is still system/user/assistant
turns, and every reader, stage and template of the project takes it as it is.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from fileio import atomic_write_bytes

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"
MAX_VOCAB = 65_500          # ids must fit uint16 shards (Megatron reads them as uint16)

# name -> piece. "eot" ends every document and is the model's eos; an existing model keeps its own eos/pad.
SPECIAL_PIECES = {
    "eot": "<|endoftext|>",
    "pad": "<|pad|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
}
TAGS = ("think_start", "think_end", "answer_start", "answer_end")
ROLES = ("system", "user", "assistant")

# The same template as text, for Hugging Face `tokenizer_config.json["chat_template"]` (export.py). Rendered with
# jinja2 and tokenized with the special pieces as special tokens, it gives exactly render_chat's ids (tested).
CHAT_TEMPLATE_JINJA = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is not none -%}"
    "{{ '<think>' if enable_thinking else '<think></think>' }}{%- endif -%}{%- endif -%}"
)
CHAT_FORMAT = ("<|im_start|>{role}\\n{content}<|im_end|> per turn, no separator between turns; roles system "
               "(optional, first), user, assistant; generation prompt <|im_start|>assistant\\n; "
               "<think></think><answer></answer> in assistant content are single special tokens; "
               "loss weight on assistant content and its <|im_end|> only")


@dataclass
class ChatTokens:
    ids: list[int]
    weights: list[float]    # per token; > 0 exactly on assistant content tokens and the assistant <|im_end|>


# ---------------------------------------------------------------------------------------------- model preparation

def prepare_model(model_bytes: bytes) -> tuple[bytes, dict[str, int], int | None, list[str]]:
    """Make a SentencePiece model usable by the project; returns (model bytes, special ids, bos id, changes).

    - every special of SPECIAL_PIECES exists as a CONTROL piece (the model's own eos/pad are reused for
      "eot"/"pad"; missing pieces are appended; user-defined ones are turned into CONTROL so text can't make them);
    - add_dummy_prefix and remove_extra_whitespaces are off, so encode is lossless (decode(encode(x)) == x) and
      encoding the chat template piece by piece equals encoding it whole;
    - the vocabulary fits uint16 (≤ MAX_VOCAB).
    Idempotent: an already prepared model comes back byte-identical (so its sha256 is stable).
    """
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf raises DecodeError; keep the message useful
        raise ValueError(f"not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise ValueError("not a SentencePiece model: no pieces")
    changes: list[str] = []
    Piece = sp_pb2.ModelProto.SentencePiece
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec

    def existing(piece_id: int) -> int | None:
        return piece_id if 0 <= piece_id < len(proto.pieces) and proto.pieces[piece_id].type == Piece.CONTROL else None

    special: dict[str, int] = {}
    own = {"eot": existing(spec.eos_id), "pad": existing(spec.pad_id)}
    for name, piece in SPECIAL_PIECES.items():
        if own.get(name) is not None:
            special[name] = own[name]
            continue
        if piece in index:
            p = proto.pieces[index[piece]]
            if p.type == Piece.USER_DEFINED:
                p.type = Piece.CONTROL
                changes.append(f"{piece}: user-defined -> control")
            elif p.type != Piece.CONTROL:
                raise ValueError(f"{piece!r} is an ordinary piece (type {p.type}) of this model; it cannot be "
                                 "turned into a special token without changing how text is tokenized")
            special[name] = index[piece]
        else:
            proto.pieces.add(piece=piece, score=0.0, type=Piece.CONTROL)
            special[name] = index[piece] = len(proto.pieces) - 1
            changes.append(f"added {piece} as id {special[name]}")
        if piece not in spec.control_symbols:  # so Hugging Face's SentencePiece converter makes it a special token
            spec.control_symbols.append(piece)
            changes.append(f"{piece} listed in trainer_spec.control_symbols")
    norm = proto.normalizer_spec
    for flag in ("add_dummy_prefix", "remove_extra_whitespaces"):
        if getattr(norm, flag):
            setattr(norm, flag, False)
            changes.append(f"normalizer {flag}: true -> false")
    if len(proto.pieces) > MAX_VOCAB:
        raise ValueError(f"vocabulary of {len(proto.pieces)} pieces (incl. the special tokens) does not fit uint16 "
                         f"token shards (max {MAX_VOCAB}); use a smaller model")
    bos = existing(spec.bos_id)
    out = proto.SerializeToString(deterministic=True) if changes else model_bytes
    return out, special, bos, changes


# ------------------------------------------------------------------------------------------------------- Tokenizer

class Tokenizer:
    """A prepared SentencePiece model plus the chat template. See the module docstring."""

    def __init__(self, model_bytes: bytes, meta: dict | None = None):
        self.model_bytes, self.special, self.bos_id, self.changes = prepare_model(model_bytes)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.special["eot"]
        self.pad_id = self.special["pad"]
        self.meta = dict(meta or {})
        self._special_text = {i: self.sp.id_to_piece(i) for i in self.special.values()}
        self._special_ids = {piece: i for i, piece in self._special_text.items()}
        self._special_re = _alternation(self._special_ids)
        self._tag_ids = {self._special_text[self.special[t]]: self.special[t] for t in TAGS}
        self._tag_re = _alternation(self._tag_ids)
        self._piece_bytes: list[bytes] | None = None
        self._cached_role_ids = {role: self.sp.encode(role + "\n") for role in ROLES}

    # -- loading and saving
    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load a directory holding tokenizer.model (+ tokenizer_meta.json) or a bare SentencePiece .model file."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {model_path}")
        meta = None
        meta_path = model_path.with_name(META_FILE)
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{meta_path} is damaged ({e}); re-run the tokenizer step") from None
        tok = cls(model_path.read_bytes(), meta)
        if meta is not None:
            if meta.get("sha256") != tok.sha256:
                raise ValueError(f"{meta_path} describes a different model (sha256 {meta.get('sha256')}, "
                                 f"{model_path} is {tok.sha256})")
            if meta.get("special") not in (None, tok.special):
                raise ValueError(f"{meta_path}: special ids {meta.get('special')} disagree with the model "
                                 f"({tok.special})")
        return tok

    def save(self, out_dir) -> Path:
        """Write tokenizer.model + tokenizer_meta.json (atomic renames); returns out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".tokenizer*.tmp-*"):   # left by a killed run
            stale.unlink(missing_ok=True)
        atomic_write_bytes(out_dir / MODEL_FILE, self.model_bytes)
        atomic_write_bytes(out_dir / META_FILE, json.dumps(self.meta_dict(), ensure_ascii=False, indent=2).encode())
        return out_dir

    def meta_dict(self) -> dict:
        return {
            **self.meta,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "special": self.special,
            "special_pieces": {name: self._special_text[i] for name, i in self.special.items()},
            "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
            "stop_ids": self.stop_ids(),
            "chat_format": CHAT_FORMAT,
            "chat_template": CHAT_TEMPLATE_JINJA,
            "prepare_changes": self.meta.get("prepare_changes", []) + self.changes,
        }

    # -- plain text
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of plain text. Special-token strings in `text` stay text unless allow_special=True (trusted text
        only, e.g. a rendered chat template): then each occurrence becomes its special id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if not allow_special:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """encode() of many texts in SentencePiece's own C++ thread pool (num_threads=-1: all cores)."""
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str")
        return self.sp.encode(list(texts), num_threads=num_threads)

    def encode_batch_arrays(self, texts: list, num_threads: int = -1, thread_pool=None) -> list[np.ndarray]:
        """encode_batch() as one int32 array per text, texts given as str or UTF-8 bytes (same ids). No Python
        int is made per token, which makes this ~20% faster than lists on big batches; UTF-8 bytes skip the
        conversion SentencePiece does otherwise while it holds the GIL. `thread_pool`: a reusable
        `sentencepiece.ThreadPool` (one per calling thread) instead of threads started for each call."""
        if not all(isinstance(t, (str, bytes)) for t in texts):
            raise TypeError("encode_batch_arrays expects a list of str or bytes")
        return self.sp.encode(list(texts), num_threads=num_threads, thread_pool=thread_pool, return_type="numpy")

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ids. Special ids come out as their strings ("<|im_end|>") unless skip_special."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        out, run = [], []
        for i in ids:
            if i in self._special_text:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self._special_text[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for (byte-fallback pieces: one raw byte), for StreamDecoder."""
        if self._piece_bytes is None:
            table = []
            for i in range(self.vocab_size):
                piece = self.sp.id_to_piece(i)
                if i in self._special_text:
                    table.append(piece.encode())
                elif self.sp.is_byte(i):
                    table.append(bytes([int(piece[3:5], 16)]))
                elif self.sp.is_unknown(i):
                    table.append(" \u2047 ".encode())  # SentencePiece's unk surface
                elif self.sp.is_control(i):
                    table.append(b"")
                else:
                    table.append(piece.replace("\u2581", " ").encode())
            self._piece_bytes = table
        return self._piece_bytes

    # -- chat
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn (<|im_end|>) or a document (end-of-text)."""
        return list(dict.fromkeys([self.special["im_end"], self.eos_id]))

    def render_chat(self, messages, add_generation_prompt: bool = False, tag_weight: float = 1.0,
                    enable_thinking: bool | None = None) -> ChatTokens:
        """Ids and loss weights of a conversation in the chat format (module docstring).

        Weights are 1.0 on assistant content and the assistant's <|im_end|>, `tag_weight` on the four reasoning tag
        tokens inside assistant content, 0.0 everywhere else (role markers, system and user turns).
        """
        texts: list[str] = []
        plan = self._chat_plan(messages, add_generation_prompt, tag_weight, texts, enable_thinking)
        return self._assemble(plan, [self.sp.encode(t) for t in texts])

    def render_chat_batch(self, conversations, add_generation_prompt: bool = False, tag_weight: float = 1.0,
                          num_threads: int = -1) -> list[ChatTokens]:
        """render_chat of many conversations, their text encoded in one call on SentencePiece's C++ thread pool
        (encoding is about two thirds of render_chat's time, and this part then scales with the cores).
        Same ids and weights as render_chat."""
        texts: list[str] = []
        plans = [self._chat_plan(m, add_generation_prompt, tag_weight, texts) for m in conversations]
        encoded = self.sp.encode(texts, num_threads=num_threads) if texts else []
        return [self._assemble(plan, encoded) for plan in plans]

    def _chat_plan(self, messages, add_generation_prompt, tag_weight, texts: list[str],
                   enable_thinking: bool | None = None) -> list[tuple]:
        """The template as (fixed ids | index into `texts`, weight) segments; appends the text to encode to `texts`."""
        _check_messages(messages)
        plan: list[tuple] = []

        def text(t, weight):
            texts.append(t)
            plan.append((len(texts) - 1, weight))

        im_start, im_end = self.special["im_start"], self.special["im_end"]
        for m in messages:
            role, content = m["role"], m["content"]
            plan.append(([im_start], 0.0))
            if role == "assistant":
                # role header and content are encoded apart (so weights split cleanly); since no piece contains
                # "\n", that equals encoding "assistant\n" + content whole (which the Jinja form does).
                plan.append((self._cached_role_ids[role], 0.0))
                for i, part in enumerate(self._tag_re.split(content)):
                    if i % 2:
                        plan.append(([self._tag_ids[part]], tag_weight))
                    elif part:
                        text(part, 1.0)
                plan.append(([im_end], 1.0))
            else:
                text(role + "\n" + content, 0.0)
                plan.append(([im_end], 0.0))
        if add_generation_prompt:
            plan.append(([im_start] + self._cached_role_ids["assistant"], 0.0))
            if enable_thinking is not None:
                think = [self.special["think_start"]] + ([] if enable_thinking else [self.special["think_end"]])
                plan.append((think, 0.0))
        return plan

    @staticmethod
    def _assemble(plan, encoded: list[list[int]]) -> ChatTokens:
        ids: list[int] = []
        weights: list[float] = []
        for segment, weight in plan:
            tokens = encoded[segment] if isinstance(segment, int) else segment
            ids.extend(tokens)
            weights.extend([weight] * len(tokens))
        return ChatTokens(ids, weights)

    def render_text(self, messages, add_generation_prompt: bool = False, enable_thinking: bool | None = None) -> str:
        """The chat as text (what CHAT_TEMPLATE_JINJA renders); encode(..., allow_special=True) gives the ids."""
        _check_messages(messages)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in messages)
        if not add_generation_prompt:
            return text
        think = "" if enable_thinking is None else "<think>" if enable_thinking else "<think></think>"
        return text + "<|im_start|>assistant\n" + think


class StreamDecoder:
    """UTF-8-safe incremental detokenizer: push(id) returns only complete characters; flush() the rest.

    A Chinese character is often split over two or three byte-fallback tokens; decoding each token alone would
    print replacement characters, so bytes are kept until a character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._bytes = tokenizer.piece_bytes()
        self._skip = set(tokenizer.special.values()) if skip_special else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < len(self._bytes):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._bytes)})")
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End of stream: an incomplete character left over comes out as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


TOOLS_SYSTEM = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
                "</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}}\n</tool_call>")


def tool_call_text(name: str, arguments) -> str:
    """One call as the model writes it; `arguments` a dict or its JSON text."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def openai_to_chat(messages, tools=None) -> list[dict]:
    """OpenAI chat messages (roles system/developer/user/assistant/tool, assistant `tool_calls`, `tools` schemas)
    -> the {role, content} turns render_chat takes (module docstring). Raises ValueError on what it cannot place."""
    out: list[dict] = []

    def add(role: str, content: str):
        if out and out[-1]["role"] == role and role == "user":   # tool results + a user message: one user turn
            out[-1]["content"] += "\n" + content
        else:
            out.append({"role": role, "content": content})

    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be text")
        if role in ("system", "developer"):
            add("system", content)
        elif role == "user":
            add("user", content)
        elif role == "assistant":
            calls = [tool_call_text(c["function"]["name"], c["function"].get("arguments") or "{}")
                     for c in m.get("tool_calls") or []]
            add("assistant", "\n".join(([content] if content else []) + calls))
        elif role == "tool":
            add("user", "<tool_response>\n" + content + "\n</tool_response>")
        else:
            raise ValueError(f"message {i}: unknown role {role!r}")
    if tools:
        block = TOOLS_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] += block
        else:
            out.insert(0, {"role": "system", "content": block.lstrip("\n")})
    return out


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")


def _alternation(strings) -> re.Pattern:
    """A regex that splits on any of `strings` (longest first) and keeps them (capturing group)."""
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) + ")")




# ------------------------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Inspect how text tokenizes (the tokenizer is trained by "
                                                 "`python data_process.py --steps tokenizer`).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("encode", help="print the pieces and ids of a text")
    p.add_argument("text")
    p.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir or .model file")
    p = sub.add_parser("info", help="print vocab size, special ids, sha256 and the chat template")
    p.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir or .model file")
    args = parser.parse_args(argv)
    tok = Tokenizer.load(args.tokenizer)
    if args.cmd == "encode":
        ids = tok.encode(args.text)
        print(f"{len(args.text)} chars -> {len(ids)} tokens")
        print(" ".join(f"{tok.id_to_piece(i)}:{i}" for i in ids))
    else:
        meta = tok.meta_dict()
        print(json.dumps({k: meta[k] for k in ("sha256", "vocab_size", "special", "stop_ids", "chat_format")},
                         ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
