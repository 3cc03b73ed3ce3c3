"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint, with a web chat page at `/`.

    python serve.py out/sft/medical/final                      # http://127.0.0.1:8000
    python serve.py out/sft/medical/final --host 0.0.0.0 --api-key "$KEY"   # elsewhere: a key is required

Endpoints follow the OpenAI API reference (https://platform.openai.com/docs/api-reference):
`POST /v1/chat/completions` and `POST /v1/completions` (streaming as server-sent events ending in
`data: [DONE]`, or one JSON body with `usage`), `GET /v1/models`, `GET /health`. Every error is an OpenAI-style
body `{"error": {"message", "type", "param", "code"}}`; a bad request is a 4xx, never a 500.

One background thread owns the model (engine.py's `Engine`, shared with GRPO rollouts): up to `--max-active`
generations advance together, one token each per batched forward (each in its own KV-cache slot, sampling with
its own settings and seed, so a reply is the one it would get alone); further requests wait in a bounded queue. A client that goes away (a
stream closed, a request cancelled) stops its generation at the next token. Extensions beyond OpenAI's fields,
as vLLM names them: `top_k`, `repetition_penalty`, `ignore_eos`.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import Engine, EngineBusy, Job
from inference import Sampling, device_error, load_model

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_ENV = "SERVE_API_KEY"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


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
    # strict: "5" is not an int and true is not a number (wrong types are a 400); unknown fields are ignored,
    # as the OpenAI API does for fields a server does not implement.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


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
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "prompt must be a string or a list of exactly one string", param="prompt")
        return self.prompt[0]


_FIELD_NAMES = {"role", "content", "text", "type", "include_usage"}


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
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


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="medical LM server", docs_url=None, redoc_url=None)
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
        sampling = Sampling(
            max_new_tokens=max_tokens or min(settings.default_max_tokens, room),
            temperature=settings.default_temperature if req.temperature is None else req.temperature,
            top_p=settings.default_top_p if req.top_p is None else req.top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=req.stop_strings(), ignore_eos=req.ignore_eos)
        return HttpJob.create(prompt_ids, sampling)

    async def next_event(job: HttpJob, request: Request):
        """The job's next event; None when the client went away (its generation is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None

    def usage(job: HttpJob) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt_ids) + job.completion_tokens}

    async def respond(request: Request, req: SamplingRequest, job: HttpJob, chat: bool):
        try:
            engine.submit(job)
        except EngineBusy as e:
            raise ApiError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": settings.model_name}

        def chunk(text: str | None, finish: str | None, first=False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps(base | {"choices": [choice]}, ensure_ascii=False) + "\n\n"

        if not req.stream:
            parts = []
            try:
                while True:
                    event = await next_event(job, request)
                    if event is None:
                        return error_response(499, "client closed the request", code="client_closed")
                    if event[0] == "text":
                        parts.append(event[1])
                    elif event[0] == "error":
                        return error_response(500, event[1], type="server_error")
                    else:
                        break
            finally:
                job.cancelled.set()
            text, finish = "".join(parts), event[1]
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return JSONResponse(base | {"object": "chat.completion" if chat else "text_completion",
                                        "choices": [choice], "usage": usage(job)})

        async def events():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    event = await next_event(job, request)
                    if event is None:
                        return
                    if event[0] == "text":
                        yield chunk(event[1], None)
                    elif event[0] == "error":
                        err = {"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}
                        yield "data: " + json.dumps(err, ensure_ascii=False) + "\n\n"
                        break
                    else:
                        yield chunk(None, event[1])
                        if req.stream_options and req.stream_options.include_usage:
                            yield "data: " + json.dumps(base | {"choices": [], "usage": usage(job)}) + "\n\n"
                        break
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
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        try:
            prompt_ids = tokenizer.render_chat(messages, add_generation_prompt=True).ids
        except ValueError as e:   # e.g. roles out of order
            raise ApiError(400, f"invalid messages: {e}", param="messages") from None
        job = make_job(req, prompt_ids, req.max_completion_tokens or req.max_tokens)
        return await respond(request, req, job, chat=True)

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
        prompt_ids = [tokenizer.eos_id] + tokenizer.encode(text)   # as chat.base_prompt: a document start
        job = make_job(req, prompt_ids, req.max_tokens)
        return await respond(request, req, job, chat=False)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "local", "max_model_len": settings.max_seq_len}]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": engine.waiting.qsize(), **engine.stats}

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


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
                              max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens)
    engine = Engine(model, tokenizer, max_active=args.max_active, max_queue=args.max_queue)
    app = create_app(engine, settings)

    import uvicorn
    print(f"serving '{settings.model_name}' ({'chat' if meta.get('chat') else 'base'} model) "
          f"on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
