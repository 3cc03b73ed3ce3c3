"""Batched KV-cache decoding: the engine the server (serve.py) and GRPO rollouts share.

One background thread owns the model. Up to `max_active` generations advance together, one token each per
batched forward (Transformer.decode_step over a SlotCache, generation i in slot i); a new request is prefilled
between steps and joins the batch. Each request samples with its own settings and seeded generator, so its reply
is the one `model.generate` gives it alone. A cancelled job stops at the next token. A request whose sampling
fails (e.g. settings that overflow to inf/nan) ends alone with an ("error", message) event; the others go on.

    engine = Engine(model, tokenizer, max_active=8)
    job = Job(prompt_ids, Sampling(max_new_tokens=64, temperature=0.7), on_event=lambda kind, value: ...)
    engine.submit(job)          # raises EngineBusy when the queue is full

The engine raises its own errors; serve.py maps them to HTTP.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from inference import Sampling, seeded_generator
from model import sample_next
from tokenizer import StreamDecoder


class EngineBusy(RuntimeError):
    """The engine's queue is full."""


class SamplingError(RuntimeError):
    """One request's sampling failed (its settings overflowed to inf/nan): that request ends, the batch goes on."""


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
class Job:
    """One generation request. The engine thread reports through `on_event(kind, value)`: ("text", str) for each
    piece of text, then ("done", "stop" | "length") or ("error", message). `tokens` collects the generated ids."""
    prompt_ids: list[int]
    sampling: Sampling
    on_event: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    stop_token: int | None = None   # the stop id that ended the reply (not in `tokens`), if one did

    def emit(self, *event):
        try:
            self.on_event(*event)
        except RuntimeError:   # e.g. the server's event loop is gone (shutting down): nobody is listening
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
        self._one = None   # the model's batch-1 decoder over self.cache (token_decoder), got at each prefill
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.stats = {"tokens_generated": 0, "requests_finished": 0, "requests_cancelled": 0,
                      "requests_failed": 0, "active": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"too many queued requests ({self.waiting.maxsize}); retry later") from None

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
                      min(s.max_new_tokens, model.config.max_seq_len - len(prompt)), len(prompt))
        if run.limit <= 0:
            return run, "stop"
        self.cache.reserve(len(prompt) + run.limit - 1)   # the last new token is never fed back
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        logits = model.forward_with_cache(ids, self.cache.slot(slot), 0, last_only=True)[0, -1].float()
        # the weights can only have changed between batches (GRPO's updates between rollouts), and a prefill comes
        # first in every batch: check them here, not at every step
        self._one = model.token_decoder(self.cache)
        return run, self._accept(run, logits)

    def _accept(self, run: Running, logits, argmax: int | None = None) -> str | None:
        """Sample the run's next token from fp32 logits [V] and emit its text; -> why it finished, or None.
        argmax: the logits' argmax if known (sample_next's pick when greedy without a repetition penalty)."""
        job, s = run.job, run.job.sampling
        if argmax is not None and s.temperature == 0 and s.repetition_penalty == 1.0:
            token = argmax
        else:
            try:
                token = sample_next(logits, s.temperature, s.top_k, s.top_p, s.repetition_penalty, run.seen,
                                    run.generator)
            except RuntimeError as e:   # torch's "probability tensor contains either inf, nan or element < 0"
                raise SamplingError(f"sampling failed with temperature={s.temperature}, top_p={s.top_p}, "
                                    f"top_k={s.top_k}, repetition_penalty={s.repetition_penalty}: {e}") from None
        if token in run.stop_ids:
            job.stop_token = token
            return "stop"
        job.completion_tokens += 1
        job.tokens.append(token)
        self.stats["tokens_generated"] += 1
        if s.repetition_penalty != 1.0:   # only the penalty reads it
            run.seen[token] = True
        text, stopped = run.stops.push(run.decoder.push(token))
        if text:
            job.emit("text", text)
        if stopped:
            return "stop_string"
        if job.completion_tokens >= s.max_new_tokens:
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
            self.stats["requests_failed"] += 1
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
        self.stats["active"] = len(active)   # before the run's done event: whoever it wakes sees the count
        return run

    def _step(self, active: list[Running]) -> None:
        """One token for every active run, in one forward."""
        if len(active) == 1 and self._one is not None:   # one compiled call, no tensors made (token_decoder)
            logits, argmax = self._one(active[0].token, active[0].position)
            logits = (logits,)
        else:
            logits = self.model.decode_step([r.token for r in active], [r.position for r in active], self.cache)
            logits, argmax = logits.float(), None
        finished = []
        for i, run in enumerate(active):
            run.position += 1
            try:
                reason, error = self._accept(run, logits[i], argmax), None
            except SamplingError as e:   # this request alone fails
                reason, error = "error", str(e)
            if reason is not None:
                finished.append((run, reason, error))
        for run, reason, error in finished:
            self._finish(self._remove(active, active.index(run)), reason, error)

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
                        self.stats["requests_failed"] += 1
                        job.emit("error", str(e) if isinstance(e, SamplingError) else f"{type(e).__name__}: {e}")
                        continue
                    if reason is None:
                        active.append(run)
                        self.stats["active"] = len(active)
                    else:
                        self._finish(run, reason)
                for run in [r for r in active if r.job.cancelled.is_set()]:
                    self._finish(self._remove(active, active.index(run)), "cancelled")
                if not active:
                    continue
                try:
                    self._step(active)
                except Exception as e:   # the batched forward itself failed: fail its requests, keep serving
                    failed = list(active)
                    active.clear()
                    self.stats["active"] = 0
                    for run in failed:
                        self._finish(run, "error", f"{type(e).__name__}: {e}")


def run_jobs(engine: Engine, jobs: list[Job]) -> list[Job]:
    """Run `jobs` to completion on the calling thread, through the engine's own prefill, batched step and finish
    (no queue, no server thread), for GRPO rollouts and benchmarks. Jobs join the batch in list order as slots
    free up, so what is generated depends only on the weights, the prompts and the seeds, never on timing. The
    engine must not be serving at the same time (nothing submitted to it). Errors end their job ("error" event)."""
    pending = list(reversed(jobs))
    active: list[Running] = []
    with torch.inference_mode():
        while pending or active:
            while pending and len(active) < engine.max_active:
                job = pending.pop()
                try:
                    run, reason = engine._start(job, len(active))
                except Exception as e:
                    job.emit("error", f"{type(e).__name__}: {e}")
                    continue
                if reason is None:
                    active.append(run)
                else:
                    engine._finish(run, reason)
            if active:
                try:
                    engine._step(active)
                except Exception as e:
                    for run in active:
                        engine._finish(run, "error", f"{type(e).__name__}: {e}")
                    active.clear()
    return jobs
