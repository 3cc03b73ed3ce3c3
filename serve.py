"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint, with a web chat page at `/`.

    python serve.py out/sft/medical/final                      # http://127.0.0.1:8000
    python serve.py out/sft/medical/final --host 0.0.0.0 --api-key "$KEY"   # elsewhere: a key is required

Endpoints follow the OpenAI API reference (https://platform.openai.com/docs/api-reference):
`POST /v1/chat/completions` and `POST /v1/completions` (streaming as server-sent events ending in
`data: [DONE]`, or one JSON body with `usage`), `GET /v1/models`, `GET /health`. Every error is an OpenAI-style
body `{"error": {"message", "type", "param", "code"}}`; a bad request is a 4xx, never a 500.

One background thread owns the model (the `Engine`): up to `--max-active` generations advance together, one
token each per batched forward (each in its own KV-cache slot, sampling with its own settings and seed, so a
reply is the one it would get alone); further requests wait in a bounded queue. A client that goes away (a
stream closed, a request cancelled) stops its generation at the next token. Extensions beyond OpenAI's fields,
as vLLM names them: `top_k`, `repetition_penalty`, `ignore_eos`.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import queue
import threading
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

from inference import device_error, load_model, seeded_generator
from model import sample_next
from tokenizer import StreamDecoder

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


# ----------------------------------------------------------------------------- generation engine

class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that could still start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to send now, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue            # ("text", str) ... then ("done", finish_reason) or ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0

    def emit(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()


@dataclass
class Running:
    """A job being generated: its sampling state, its text state, and where it stands in its KV-cache slot."""
    job: Job
    decoder: StreamDecoder
    stops: StopMatcher
    generator: torch.Generator
    seen: torch.Tensor              # bool [V]: tokens of the prompt and the reply (repetition penalty)
    stop_ids: frozenset
    limit: int                      # new tokens the context leaves room for
    position: int                   # tokens in the cache: where the next token fed goes
    token: int = -1                 # the token sampled last, fed at the next step


class Engine:
    """The one thread that runs the model. Up to max_active generations share one batched forward per token
    (Transformer.decode_step over a SlotCache, generation i in slot i); a new request is prefilled between
    steps and joins the batch. Each request samples with its own settings and seeded generator, so its reply
    is the one model.generate gives it alone."""

    def __init__(self, model, tokenizer, max_active: int = 8, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_active = max_active
        self.cache = model.new_slot_cache(max_active)
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.stats = {"tokens_generated": 0, "requests_finished": 0, "requests_cancelled": 0, "active": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "the server is busy: too many queued requests, retry later",
                           type="rate_limit_error", code="queue_full") from None

    def _start(self, job: Job, slot: int) -> tuple[Running, str | None]:
        """Prefill the prompt into `slot` and sample the first token; -> (the run, why it already finished)."""
        s, model = job.sampling, self.model
        prompt = [int(t) for t in job.prompt_ids]
        model.check_generation(prompt, s.temperature, s.top_k, s.top_p, s.repetition_penalty)
        device = model.lm_head.weight.device
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
        run = Running(job, StreamDecoder(self.tokenizer), StopMatcher(s.stop), seeded_generator(model, s.seed), seen,
                      frozenset(() if s.ignore_eos else self.tokenizer.stop_ids()),
                      min(s.max_tokens, model.config.max_seq_len - len(prompt)), len(prompt))
        if run.limit <= 0:
            return run, "stop"
        self.cache.reserve(len(prompt) + run.limit - 1)   # the last new token is never fed back
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        logits = model.forward_with_cache(ids, self.cache.slot(slot), 0, last_only=True)[0, -1].float()
        return run, self._accept(run, logits)

    def _accept(self, run: Running, logits) -> str | None:
        """Sample the run's next token from fp32 logits [V] and emit its text; -> why it finished, or None."""
        job, s = run.job, run.job.sampling
        token = sample_next(logits, s.temperature, s.top_k, s.top_p, s.repetition_penalty, run.seen, run.generator)
        if token in run.stop_ids:
            return "stop"
        job.completion_tokens += 1
        self.stats["tokens_generated"] += 1
        run.seen[token] = True
        text, stopped = run.stops.push(run.decoder.push(token))
        if text:
            job.emit("text", text)
        if stopped:
            return "stop_string"
        if job.completion_tokens >= s.max_tokens:
            return "length"
        if job.completion_tokens >= run.limit:   # the context is full: generate() ends there too
            return "stop"
        run.token = token
        return None

    def _finish(self, run: Running, reason: str | None, error: str | None = None):
        job = run.job
        if reason == "cancelled":
            self.stats["requests_cancelled"] += 1
            return
        if error is not None:
            job.emit("error", error)
            return
        tail = run.stops.flush() if reason != "stop_string" else ""
        if tail:
            job.emit("text", tail)
        self.stats["requests_finished"] += 1
        job.emit("done", "length" if reason == "length" else "stop")

    def _remove(self, active: list[Running], i: int) -> Running:
        """Take run i out of the batch; the last run moves into its slot, so slots stay 0..n-1."""
        run, last = active[i], active.pop()
        if last is not run:
            active[i] = last
            self.cache.move(len(active), i, last.position)
        return run

    def _step(self, active: list[Running]) -> None:
        """One token for every active run, in one forward."""
        logits = self.model.decode_step([r.token for r in active], [r.position for r in active], self.cache).float()
        finished = []
        for i, run in enumerate(active):
            run.position += 1
            reason = self._accept(run, logits[i])
            if reason is not None:
                finished.append((run, reason))
        for run, reason in finished:
            self._finish(self._remove(active, active.index(run)), reason)

    def _run(self):
        with torch.inference_mode():
            active: list[Running] = []
            while True:
                while len(active) < self.max_active:
                    try:
                        job = self.waiting.get(block=not active)
                    except queue.Empty:
                        break
                    if job.cancelled.is_set():
                        self.stats["requests_cancelled"] += 1
                        continue
                    try:
                        run, reason = self._start(job, len(active))
                    except Exception as e:   # a bug or a bad prompt must fail its request, not the engine
                        job.emit("error", f"{type(e).__name__}: {e}")
                        continue
                    if reason is None:
                        active.append(run)
                    else:
                        self._finish(run, reason)
                for run in [r for r in active if r.job.cancelled.is_set()]:
                    self._finish(self._remove(active, active.index(run)), "cancelled")
                self.stats["active"] = len(active)
                if not active:
                    continue
                try:
                    self._step(active)
                except Exception as e:   # the batch failed: fail its requests, keep serving
                    for run in active:
                        self._finish(run, "error", f"{type(e).__name__}: {e}")
                    active.clear()
                self.stats["active"] = len(active)


# ----------------------------------------------------------------------------- the app

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

    def make_job(req: SamplingRequest, prompt_ids: list[int], max_tokens: int | None) -> Job:
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
            max_tokens=max_tokens or min(settings.default_max_tokens, room),
            temperature=settings.default_temperature if req.temperature is None else req.temperature,
            top_p=settings.default_top_p if req.top_p is None else req.top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=req.stop_strings(), ignore_eos=req.ignore_eos)
        return Job(prompt_ids, sampling, asyncio.get_running_loop(), asyncio.Queue())

    async def next_event(job: Job, request: Request):
        """The job's next event; None when the client went away (its generation is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt_ids) + job.completion_tokens}

    async def respond(request: Request, req: SamplingRequest, job: Job, chat: bool):
        engine.submit(job)
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
