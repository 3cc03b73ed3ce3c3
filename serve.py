"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint, with a web chat page at `/`.

    python serve.py out/sft/medical/final                      # http://127.0.0.1:8000
    python serve.py out/sft/medical/final --host 0.0.0.0 --api-key "$KEY"   # elsewhere: a key is required

Endpoints follow the OpenAI API reference (https://platform.openai.com/docs/api-reference):
`POST /v1/chat/completions` and `POST /v1/completions` (streaming as server-sent events ending in
`data: [DONE]`, or one JSON body with `usage`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Every error
is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; a bad request is a 4xx, never a 500
(malformed JSON, integers past Python's 4,300-digit limit, nesting deeper than MAX_JSON_DEPTH, lone surrogates in
any string). An OpenAI parameter the server does not implement is a 400 "unsupported parameter" unless it is given
at its neutral value (`frequency_penalty: 0`, `response_format: {"type": "text"}`, ...), as OpenAI answers unknown
arguments. A conversation that ends with an assistant message is continued (assistant prefill); a completion
prompt may be token ids. `--cors-origin` opts in to CORS for browser clients on other origins.

One background thread owns the model (engine.py's `Engine`, shared with GRPO rollouts): up to `--max-active`
generations advance together, one token each per batched forward (each in its own KV-cache slot, sampling with
its own settings and seed, so a reply is the one it would get alone); further requests wait in a bounded queue. A client that goes away (a
stream closed, a request cancelled, a non-streaming client that timed out) stops its generation at the next token:
the disconnect is watched for all the time, not only between tokens. A request whose sampling fails ends alone.
Extensions beyond OpenAI's fields, as vLLM names them: `top_k`, `repetition_penalty`, `ignore_eos`,
`chat_template_kwargs: {"enable_thinking": true | false}` (the chat template's thinking switch).
Reasoning: a reply's `<think>…</think>` comes back as `message.reasoning_content` (streamed as
`delta.reasoning_content`), the rest as `content` with the `<answer>` tags dropped, as DeepSeek-style servers do.
Tools: `tools` (function JSON schemas) and `tool_choice` "auto" | "none" are rendered by tokenizer.openai_to_chat
(with `tool` messages and assistant `tool_calls`); the reply's `<tool_call>{json}</tool_call>` blocks come back as
OpenAI `tool_calls` (streamed as one delta per call) with `finish_reason: "tool_calls"`.
Sampling ranges: temperature or top_p below GREEDY_BELOW sample greedily (as vLLM does: their fp32 math would
overflow), repetition_penalty must lie in [0.01, 10].
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import Engine, EngineBusy, Job
from inference import Sampling, device_error, load_model
from tokenizer import openai_to_chat

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_ENV = "SERVE_API_KEY"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_JSON_DEPTH = 32          # a request body nested deeper is a 400 (no OpenAI request needs more than ~8)
GREEDY_BELOW = 1e-5          # temperature or top_p below this samples greedily (vLLM's _SAMPLING_EPS)
_SURROGATE = re.compile("[\ud800-\udfff]")   # JSON "\ud800" escapes decode to lone surrogates: not text


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error the client caused (or a full queue): becomes an OpenAI-style JSON body with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ----------------------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number (wrong types are a 400). Unknown top-level fields are
    # checked by check_parameters (a 400 unless neutral or bookkeeping); unknown fields inside a message are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


def _is_zero(v) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


# OpenAI parameters this server does not implement: allowed only at a value that changes nothing.
NEUTRAL_VALUES = {
    "frequency_penalty": _is_zero, "presence_penalty": _is_zero,
    "logit_bias": lambda v: v is None or v == {},
    "response_format": lambda v: v is None or v == {"type": "text"},
    "top_logprobs": _is_zero,
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "suffix": lambda v: v is None or v == "",
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
}
# Bookkeeping fields with no effect on the reply: accepted and ignored.
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier"}


def check_parameters(obj: dict, schema: type[BaseModel]) -> None:
    """A 400 "unsupported parameter" for a field the schema lacks, unless neutral or bookkeeping."""
    for key, value in obj.items():
        if key in schema.model_fields or key in IGNORED_FIELDS:
            continue
        if key in NEUTRAL_VALUES and NEUTRAL_VALUES[key](value):
            continue
        what = "is not supported by this server" if key in NEUTRAL_VALUES else "is not a parameter this API knows"
        raise ApiError(400, f"unsupported parameter: '{key}' {what}", param=key, code="unsupported_parameter")


def check_json(obj) -> None:
    """A 400 for nesting deeper than MAX_JSON_DEPTH or a lone surrogate in any key or string (walked without
    recursion, so no body can exhaust the stack)."""
    stack = [(obj, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels",
                           code="invalid_json")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ApiError(400, f"invalid value for '{where or 'body'}': a lone UTF-16 surrogate is not text",
                               param=where or None, code="invalid_value")
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise ApiError(400, "a key of the request body holds a lone UTF-16 surrogate", code="invalid_json")
                stack.append((v, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str            # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None     # assistant
    tool_call_id: str | None = None              # tool

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None     # True: the reply starts with <think>; False: with <think></think>


REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class ToolCallParser:
    """Takes the reply's content stream and cuts out <tool_call>{json}</tool_call> blocks as OpenAI tool calls;
    a block that is not a JSON {"name", "arguments"} stays content. An unclosed block at the end (the model stopped
    at <|im_end|>) is still a call if its JSON is whole."""
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.pending, self.inside, self.calls = "", False, []

    def push(self, text: str) -> list[tuple[str, object]]:
        """-> [("content", str) | ("tool_call", dict)] in order."""
        self.pending += text
        out: list[tuple[str, object]] = []
        while True:
            if self.inside:
                end = self.pending.find(self.CLOSE)
                if end < 0:
                    return out
                self._call(out, self.pending[:end], closed=True)
                self.pending, self.inside = self.pending[end + len(self.CLOSE):], False
            else:
                start = self.pending.find(self.OPEN)
                if start < 0:
                    hold = max((k for k in range(1, len(self.OPEN)) if self.pending.endswith(self.OPEN[:k])),
                               default=0)
                    cut = len(self.pending) - hold
                    if cut:
                        out.append(("content", self.pending[:cut]))
                    self.pending = self.pending[cut:]
                    return out
                if start:
                    out.append(("content", self.pending[:start]))
                self.pending, self.inside = self.pending[start + len(self.OPEN):], True

    def flush(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        if self.inside:
            self._call(out, self.pending, closed=False)
        elif self.pending:
            out.append(("content", self.pending))
        self.pending, self.inside = "", False
        return out

    def _call(self, out: list, body: str, closed: bool) -> None:
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", {})
            if not isinstance(name, str) or not isinstance(args, (dict, str)):
                raise TypeError
        except (ValueError, TypeError, KeyError, AttributeError):
            out.append(("content", self.OPEN + body + (self.CLOSE if closed else "")))
            return
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = {"index": len(self.calls), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        out.append(("tool_call", call))


class ReasoningParser:
    """Splits streamed reply text into reasoning (inside <think>…</think>) and content (the rest, <answer> tags
    dropped); a tail that could still begin a tag is held back until the next piece (or flush)."""

    def __init__(self, thinking: bool = False):   # thinking: the prompt already opened <think>
        self.thinking = thinking
        self.pending = ""

    def push(self, text: str) -> list[tuple[str, str]]:
        """-> [(field, text)] with field "reasoning_content" or "content", in order."""
        self.pending += text
        out: list[tuple[str, str]] = []
        while True:
            hits = [(i, tag) for tag in REASONING_TAGS if (i := self.pending.find(tag)) >= 0]
            if not hits:
                break
            i, tag = min(hits)
            self._emit(out, self.pending[:i])
            self.pending = self.pending[i + len(tag):]
            if tag in ("<think>", "</think>"):
                self.thinking = tag == "<think>"
        hold = max((k for tag in REASONING_TAGS for k in range(1, len(tag)) if self.pending.endswith(tag[:k])),
                   default=0)
        self._emit(out, self.pending[:len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def _emit(self, out: list, text: str) -> None:
        if text:
            field = "reasoning_content" if self.thinking else "content"
            if out and out[-1][0] == field:
                out[-1] = (field, out[-1][1] + text)
            else:
                out.append((field, text))


class SamplingRequest(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)   # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)       # one choice per request
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    ignore_eos: bool = False                    # generate exactly max_tokens (benchmarks)
    logprobs: bool | int | None = None          # not implemented: refused rather than silently ignored

    def check_unsupported(self):
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop may hold at most 4 sequences", param="stop")
        if any(s == "" for s in stops):
            raise ApiError(400, "stop sequences must not be empty", param="stop")
        return stops


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)   # the newer name for max_tokens
    chat_template_kwargs: ChatTemplateKwargs | None = None          # vLLM's name: {"enable_thinking": bool}
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | dict | None = None
    parallel_tool_calls: bool | None = None

    def active_tools(self) -> list[dict]:
        if isinstance(self.tool_choice, dict):
            raise ApiError(400, "tool_choice naming a function is not supported by this server (use \"auto\")",
                           param="tool_choice", code="unsupported_value")
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def enable_thinking(self) -> bool | None:
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    def prompt_text(self) -> str | list[int]:
        """The prompt as text, or as token ids (a list of ints, or a list holding one)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 0 or (len(self.prompt) != 1 and not isinstance(self.prompt[0], int)):
            raise ApiError(400, "prompt must be a string, a list of token ids, or a list of exactly one of those",
                           param="prompt")
        return self.prompt if isinstance(self.prompt[0], int) else self.prompt[0]


_FIELD_NAMES = {"role", "content", "text", "type", "include_usage", "enable_thinking", "tool_calls", "function",
                "name", "arguments", "id", "tool_call_id", "parameters", "description", "strict"}


def _param_from_loc(loc) -> str:
    """pydantic's error location -> OpenAI's `param` (e.g. "messages[0].role"); union branch tags are dropped."""
    param = str(loc[0]) if loc else ""
    for part in loc[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELD_NAMES:
            param += f".{part}"
    return param


async def read_body(request: Request, schema: type[BaseModel], max_bytes: int):
    """Read at most max_bytes of JSON and validate it into `schema`, or raise the matching ApiError."""
    size = int(request.headers.get("content-length") or 0)
    if size > max_bytes:
        raise ApiError(413, f"request body of {size} bytes exceeds the limit of {max_bytes}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:   # also: an integer past the 4,300-digit conversion limit
        raise ApiError(400, f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    check_json(obj)
    check_parameters(obj, schema)
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param_from_loc(err["loc"])
        code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
        raise ApiError(400, f"invalid value for '{param}': {err['msg']}", param=param, code=code) from None


# ----------------------------------------------------------------------------- the app

@dataclass
class HttpJob(Job):
    """A Job whose events land in an asyncio queue of the server's event loop (the engine runs in its thread)."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @classmethod
    def create(cls, prompt_ids: list[int], sampling: Sampling) -> "HttpJob":
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        return cls(prompt_ids, sampling, lambda *event: loop.call_soon_threadsafe(events.put_nowait, event),
                   events=events)


@dataclass
class ServerSettings:
    model_name: str
    max_seq_len: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    default_temperature: float = 0.7
    default_top_p: float = 0.9
    system_fingerprint: str = ""
    cors_origins: list[str] = field(default_factory=list)
    vocab_size: int = 0


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="medical LM server", docs_url=None, redoc_url=None)
    if settings.cors_origins:   # opt-in: browser pages on these origins may call the API (the key still applies)
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    def require_key(request: Request):
        """`Authorization: Bearer <key>` on every /v1 route when the server has a key (constant-time compare)."""
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def check_model(name: str):
        if name != settings.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server has '{settings.model_name}'",
                           param="model", code="model_not_found")

    def make_job(req: SamplingRequest, prompt_ids: list[int], max_tokens: int | None) -> HttpJob:
        room = settings.max_seq_len - len(prompt_ids)
        if max_tokens is not None and max_tokens > settings.max_seq_len:
            raise ApiError(400, f"max_tokens is {max_tokens}; this model's context is {settings.max_seq_len} tokens",
                           param="max_tokens", code="invalid_value")
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ApiError(400, f"this model's context is {settings.max_seq_len} tokens; the prompt has "
                                f"{len(prompt_ids)} and {max_tokens or 1} more were asked for",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        temperature = settings.default_temperature if req.temperature is None else req.temperature
        top_p = settings.default_top_p if req.top_p is None else req.top_p
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:   # the only token left is the most likely one
            temperature, top_p = 0.0, 1.0
        sampling = Sampling(
            max_new_tokens=max_tokens or min(settings.default_max_tokens, room),
            temperature=temperature, top_p=top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=req.stop_strings(), ignore_eos=req.ignore_eos)
        return HttpJob.create(prompt_ids, sampling)

    async def watch_disconnect(request: Request, job: HttpJob):
        """Wait for the client to go away, whatever the events do; then cancel the job and wake its reader.
        (The body is already read, so the next ASGI message is the disconnect.)"""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancelled.set()
                job.events.put_nowait(("disconnected", None))
                return
            await asyncio.sleep(0.05)

    async def next_event(job: HttpJob, request: Request, watched: bool = True):
        """The job's next event; None when the client went away (its generation is then cancelled). Unless
        watch_disconnect runs (`watched`), the client is polled whenever no event came for 0.25 s."""
        while True:
            try:
                event = await (job.events.get() if watched else asyncio.wait_for(job.events.get(), timeout=0.25))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            return None if event[0] == "disconnected" else event

    def usage(job: HttpJob) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt_ids) + job.completion_tokens}

    async def respond(request: Request, req: SamplingRequest, job: HttpJob, chat: bool, thinking: bool = False,
                      tools: bool = False):
        try:
            engine.submit(job)
        except EngineBusy as e:
            raise ApiError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": settings.model_name,
                "system_fingerprint": settings.system_fingerprint}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        parser = ReasoningParser(thinking)
        calls = ToolCallParser() if tools else None

        def pieces(text: str | None) -> list[tuple[str, object]]:
            """A text event (None: the end) -> [(field, value)]: reasoning_content, content, tool_call."""
            if not chat:
                return [("content", text)] if text else []
            split = parser.push(text) if text is not None else parser.flush()
            if calls is None:
                return split
            out = []
            for kind, piece in split:
                out += calls.push(piece) if kind == "content" else [(kind, piece)]
            return out + (calls.flush() if text is None else [])

        def chunk(text, finish: str | None, first=False, field: str = "content") -> str:
            if chat:
                if field == "tool_call":
                    text, field = [text], "tool_calls"
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({field: text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            # with include_usage every chunk but the last carries "usage": null (OpenAI's stream format)
            return "data: " + json.dumps(base | {"choices": [choice]} | ({"usage": None} if include_usage else {}),
                                         ensure_ascii=False) + "\n\n"

        # Until the first event (the prompt's prefill and first token) the client is watched for a disconnect by a
        # task of our own; a non-streaming request keeps it to the end. So an engine error before the first
        # token is a plain error response, never a 200 stream that then reports an error.
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            first = await next_event(job, request)
        finally:
            if req.stream:
                watcher.cancel()
        if first is None or first[0] == "error":
            watcher.cancel()
            job.cancelled.set()
            if first is None:
                return error_response(499, "client closed the request", code="client_closed")
            return error_response(500, first[1], type="server_error")

        if not req.stream:
            parts, event = [], first
            try:
                while True:
                    if event is None:
                        return error_response(499, "client closed the request", code="client_closed")
                    if event[0] == "text":
                        parts.append(event[1])
                    elif event[0] == "error":
                        return error_response(500, event[1], type="server_error")
                    else:
                        break
                    event = await next_event(job, request)
            finally:
                watcher.cancel()
                job.cancelled.set()
            text, finish = "".join(parts), event[1]
            if chat:
                fields, tool_calls = {"content": "", "reasoning_content": ""}, []
                for kind, piece in pieces(text) + pieces(None):
                    if kind == "tool_call":
                        tool_calls.append({k: v for k, v in piece.items() if k != "index"})
                    else:
                        fields[kind] += piece
                message = {"role": "assistant", "content": fields["content"]}
                if fields["reasoning_content"] or thinking:
                    message["reasoning_content"] = fields["reasoning_content"]
                if tool_calls:
                    message["tool_calls"], finish = tool_calls, "tool_calls"
                    message["content"] = fields["content"].strip() or None
                choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return JSONResponse(base | {"object": "chat.completion" if chat else "text_completion",
                                        "choices": [choice], "usage": usage(job)})

        async def events():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                event = first
                while True:
                    if event is None:
                        return
                    if event[0] == "text":
                        for kind, piece in pieces(event[1]):
                            yield chunk(piece, None, field=kind)
                    elif event[0] == "error":
                        err = {"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}
                        yield "data: " + json.dumps(err, ensure_ascii=False) + "\n\n"
                        break
                    else:
                        for kind, piece in pieces(None):
                            yield chunk(piece, None, field=kind)
                        yield chunk(None, "tool_calls" if calls and calls.calls else event[1])
                        if include_usage:
                            yield "data: " + json.dumps(base | {"choices": [], "usage": usage(job)}) + "\n\n"
                        break
                    event = await next_event(job, request, watched=False)
                yield "data: [DONE]\n\n"
            finally:   # also runs when the client disconnects and the server closes this generator
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest, settings.max_body_bytes)
        check_model(req.model)
        req.check_unsupported()
        last = req.messages[-1]
        if last.role not in ("user", "assistant", "tool") or (last.role == "assistant" and last.tool_calls):
            raise ApiError(400, "the last message must come from the user or a tool (or be an assistant prefill "
                                "to continue)", param="messages")
        prefill = last.role == "assistant"
        if prefill and len(req.messages) == 1:
            raise ApiError(400, "an assistant prefill needs a user message before it", param="messages")
        tools = req.active_tools()
        try:
            messages = openai_to_chat([{"role": m.role, "content": m.text(), "tool_calls": [
                c.model_dump() for c in m.tool_calls or []]} for m in req.messages], tools)
        except ValueError as e:   # e.g. tool-call arguments that are not JSON
            raise ApiError(400, f"invalid messages: {e}", param="messages") from None
        try:
            # prefill: the conversation as rendered, less the last <|im_end|>: the reply continues that message
            prompt_ids = tokenizer.render_chat(messages, add_generation_prompt=not prefill,
                                               enable_thinking=None if prefill else req.enable_thinking()).ids
        except ValueError as e:   # e.g. roles out of order
            raise ApiError(400, f"invalid messages: {e}", param="messages") from None
        if prefill:
            prompt_ids = prompt_ids[:-1]
        job = make_job(req, prompt_ids, req.max_completion_tokens or req.max_tokens)
        # the reply starts inside <think> when the prompt opened it (thinking on, or a prefill mid-reasoning)
        opened = ReasoningParser()
        opened.push(messages[-1]["content"] if prefill else "")
        thinking = req.enable_thinking() is True or opened.thinking
        return await respond(request, req, job, chat=True, thinking=thinking, tools=bool(tools))

    @v1.post("/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest, settings.max_body_bytes)
        check_model(req.model)
        req.check_unsupported()
        if req.echo:
            raise ApiError(400, "echo is not supported by this server", param="echo")
        text = req.prompt_text()
        if not text:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if isinstance(text, list):   # token ids, taken as they are
            bad = [t for t in text if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token ids out of range [0, {tokenizer.vocab_size}): {bad[:5]}",
                               param="prompt", code="invalid_value")
            prompt_ids = list(text)
        else:
            prompt_ids = [tokenizer.eos_id] + tokenizer.encode(text)   # as chat.base_prompt: a document start
        job = make_job(req, prompt_ids, req.max_tokens)
        return await respond(request, req, job, chat=False)

    model_card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "local",
                  "max_model_len": settings.max_seq_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": engine.waiting.qsize(), **engine.stats}

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def system_fingerprint(meta: dict, dtype: str, lora_dir) -> str:
    """OpenAI's `system_fingerprint`: names the weights and settings that answer (it changes when they do)."""
    import hashlib
    weights = meta.get("files", {}).get("model.safetensors", {}).get("sha256", "")
    key = f"{weights}:{meta.get('tokenizer_sha256', '')}:{dtype}:{Path(lora_dir).resolve() if lora_dir else ''}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def default_model_name(ckpt_dir: Path) -> str:
    """`out/sft/medical/final` -> "medical-final": the last two path parts say which checkpoint it is."""
    return "-".join(Path(ckpt_dir).resolve().parts[-2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="OpenAI-compatible server (chat + completions) with a web chat page.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (model.safetensors, config.json, tokenizer)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA adapter directory to merge into the model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer <key>' on /v1/* (default: ${API_KEY_ENV}); "
                        "mandatory when --host is not a loopback address")
    p.add_argument("--model-name", default=None, help="model id clients must send (default: last two path parts)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype for inference")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-active", type=int, default=8,
                   help="generations decoded together, one batched forward per token")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get a 429")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens when a request gives none")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get a 413")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages on ORIGIN (e.g. http://localhost:3000, or *) to call the API; repeatable")
    args = p.parse_args(argv)

    if args.host not in LOOPBACK_HOSTS and not args.api_key:
        p.error(f"listening on {args.host} needs an API key: pass --api-key or set ${API_KEY_ENV}")
    if device_error(args.device):
        p.error(device_error(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, meta = load_model(args.checkpoint, lora_dir=args.lora, dtype=args.dtype, device=args.device)
    settings = ServerSettings(model_name=args.model_name or default_model_name(args.checkpoint),
                              max_seq_len=model.config.max_seq_len, api_key=args.api_key,
                              max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens,
                              system_fingerprint=system_fingerprint(meta, args.dtype, args.lora),
                              cors_origins=args.cors_origin)
    engine = Engine(model, tokenizer, max_active=args.max_active, max_queue=args.max_queue)
    app = create_app(engine, settings)

    import uvicorn
    print(f"serving '{settings.model_name}' ({'chat' if meta.get('chat') else 'base'} model) "
          f"on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
