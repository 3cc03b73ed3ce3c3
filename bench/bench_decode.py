"""Benchmark CPU decode: the server's batched decode (engine.Engine) against llama.cpp on the same weights.

    python bench/bench_decode.py [--preset 26m] [--threads 1] [--new-tokens 48] [--batches 1 4 8] [--rounds 5]

Needs llama-cpp-python (`bash script/setup.sh --with-llama-cpp`). The model: the given preset with the real
ChatGLM2 tokenizer (65K vocabulary, as the issue measured), random init scaled up so greedy decoding wanders.
export.py --gguf writes the same weights as f32 and bf16 GGUFs. For each batch size B, B sequences of the same
prompt decode `--new-tokens` greedy tokens together:
- ours: engine.Engine (what serve.py runs), max_active=B, fp32 and bf16 weights (bf16 at batch 1 through
  bf16_gemv's compiled step where the CPU has avx512_bf16 and a C compiler, else oneDNN); tokens/s = tokens
  made / wall time from the first text after every sequence's prefill to the last token (the prefills excluded;
  detokenizing, stop matching and the events included);
- llama.cpp: one llama_context with B sequences (n_seq_max = B), one llama_decode per step of B tokens, greedy
  argmax in numpy, f32 and bf16 GGUF, the same thread count, the KV cache in f32 (as ours); timed the same way.
Each round runs every pair back to back (ours fp32 / llama.cpp f32, ours bf16 / llama.cpp bf16, which one first
alternating by round), since other jobs share the machine: the ratio printed is the median over rounds of each
pair's ratio (with its range), the rates the best of each (and the load average before and after). Prints one
line per case and the ratio ours / llama.cpp bf16 (the issue's target: >= 0.8), then one decode_step alone, the
module path (lean=False, what decode ran before its lean path) against the lean path, ms per step and the
speedup.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT.parent / "shared" / "corpora-samples"
PROMPT = "患者，男，45岁，因反复咳嗽、咳痰3年，加重伴发热1周入院。请给出诊断思路："


def make_checkpoint(out_dir: Path, preset: str) -> Path:
    from checkpoint import save_checkpoint
    from model import Transformer, make_config
    from tokenizer import Tokenizer
    tok = Tokenizer.load(SAMPLES / "chatglm2-tokenizer" / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(make_config(preset, tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return save_checkpoint(out_dir, model, tok, {"step": 0, "tokens_seen": 0, "kind": "sft", "chat": True})


def ours(model, tok, batch: int, n_new: int) -> tuple[float, list[int]]:
    """-> (tokens/s of engine.Engine decoding `batch` greedy sequences together, the reply): from the first text
    event after every sequence's prefill to the last token, over the tokens generated in between (the prefills
    excluded, as llama.cpp's below; detokenizing, stop matching and events included, which llama.cpp's loop
    does not do)."""
    from engine import Engine, Job
    from inference import Sampling
    engine = Engine(model, tok, max_active=batch)
    prompt = tok.encode(PROMPT)
    lock, first, done = threading.Lock(), [], threading.Semaphore(0)
    jobs = []

    def on_event(kind, value):
        if kind == "text":
            with lock:   # the time and the tokens made by then (a token may hold no text: counted, not assumed)
                counts = [job.completion_tokens for job in jobs] if not first else None
                if counts and min(counts) >= 1:
                    first.extend([time.perf_counter(), sum(counts)])
        else:
            done.release()
    # plain greedy, as llama.cpp's argmax below (Sampling's default repetition_penalty 1.1 costs a pass over V)
    jobs.extend(Job(prompt, Sampling(max_new_tokens=n_new, temperature=0, repetition_penalty=1.0, ignore_eos=True),
                    on_event) for _ in range(batch))
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        done.acquire()
    end = time.perf_counter()
    assert all(job.completion_tokens == n_new for job in jobs)
    assert all(job.tokens == jobs[0].tokens for job in jobs)   # B copies of one prompt: one reply
    return (batch * n_new - first[1]) / (end - first[0]), jobs[0].tokens


def step_ms(model, batch: int, lean: bool, steps: int = 12) -> float:
    """ms of one Transformer.decode_step of `batch` rows at position ~40 (no engine, no sampling)."""
    cache = model.new_slot_cache(batch)
    cache.reserve(64)
    tokens, positions = list(range(5, 5 + batch)), [40 + b for b in range(batch)]
    with torch.inference_mode():
        model.decode_step(tokens, positions, cache, lean=lean)
        start = time.perf_counter()
        for _ in range(steps):
            model.decode_step(tokens, positions, cache, lean=lean)
    return (time.perf_counter() - start) / steps * 1e3


class LlamaBatched:
    """llama.cpp with `batch` sequences in one context: one llama_decode of B tokens per step."""

    def __init__(self, path: Path, batch: int, threads: int, n_ctx: int):
        import llama_cpp
        self.lib, self.batch = llama_cpp, batch
        default = llama_cpp.llama_cpp.llama_context_default_params

        def params():   # Llama() does not take n_seq_max; set it where Llama reads its defaults
            p = default()
            p.n_seq_max = batch
            return p
        llama_cpp.llama_cpp.llama_context_default_params = params
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx * batch, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, type_k=0, type_v=0, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_context_default_params = default
        self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()
        self.b = llama_cpp.llama_batch_init(max(batch, 512), 0, batch)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, want logits)."""
        b = self.b
        b.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def run(self, prompt: list[int], n_new: int) -> tuple[float, list[int]]:
        """-> (tokens/s from the first token to the last, sequence 0's tokens)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        tokens = []
        for seq in range(self.batch):   # prefill each sequence (as the engine prefills each request)
            self._decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            tokens.append([self._argmax(len(prompt) - 1)])
        start = time.perf_counter()
        for step in range(1, n_new):
            pos = len(prompt) + step - 1
            self._decode([(tokens[s][-1], pos, s, True) for s in range(self.batch)])
            for s in range(self.batch):
                tokens[s].append(self._argmax(s))
        return self.batch * (n_new - 1) / (time.perf_counter() - start), tokens[0]


def measure(preset: str = "26m", threads: int = 1, new_tokens: int = 48, batches=(1, 4, 8), rounds: int = 5) -> dict:
    """Prints one line per batch size; -> the figures by name (bench/run_all.py's format)."""
    from types import SimpleNamespace
    from export import export_gguf
    from inference import load_model
    args = SimpleNamespace(preset=preset, threads=threads, new_tokens=new_tokens, batches=batches, rounds=rounds)
    torch.set_num_threads(args.threads)
    figures = {"preset": preset, "threads": threads, "new_tokens": new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp / "ckpt", args.preset)
        ggufs = {t: export_gguf(ckpt, tmp / f"gguf-{t}", gguf_type=t) / "model.gguf" for t in ("f32", "bf16")}
        models = {d: load_model(ckpt, dtype=d) for d in ("fp32", "bf16")}
        tok = models["fp32"][1]
        prompt = tok.encode(PROMPT)
        n_ctx = len(prompt) + args.new_tokens + 8
        import bf16_gemv
        print(f"preset {args.preset} ({models['fp32'][0].num_params() / 1e6:.1f}M params, vocab {tok.vocab_size}), "
              f"{args.threads} thread(s), {args.new_tokens} new tokens, prompt {len(prompt)} tokens, bf16 batch 1 "
              f"through {'bf16_gemv' if bf16_gemv.available() else 'oneDNN (no bf16_gemv kernel here)'}")
        figures["bf16_batch1_kernel"] = "bf16_gemv" if bf16_gemv.available() else "onednn"
        expected = list(models["fp32"][0].generate(prompt, max_new_tokens=args.new_tokens, temperature=0))
        for batch in args.batches:
            llamas = {t: LlamaBatched(path, batch, args.threads, n_ctx) for t, path in ggufs.items()}
            rates: dict[str, list[float]] = {}
            same = None
            for model, _, _ in models.values():   # the first step at a batch size packs its weights: not timed
                ours(model, tok, batch, 2)
            load = [os.getloadavg()[0]]
            for r in range(args.rounds):
                # each pair back to back (ours fp32 / llama.cpp f32, ours bf16 / llama.cpp bf16), which one first
                # alternating by round: the other jobs on the machine change the pair's conditions less than the run's
                for dtype, t in (("fp32", "f32"), ("bf16", "bf16")):
                    model = models[dtype][0]
                    for side in (("ours", "llama") if r % 2 == 0 else ("llama", "ours")):
                        if side == "ours":
                            rate, tokens = ours(model, tok, batch, args.new_tokens)
                            if dtype == "fp32" and tokens != expected:   # the engine's lean decode vs model.generate
                                raise AssertionError(f"engine fp32 greedy tokens differ from model.generate at "
                                                     f"batch {batch}")
                            rates.setdefault(f"ours_{dtype}", []).append(rate)
                        else:
                            rate, tokens = llamas[t].run(prompt, args.new_tokens)
                            if t == "f32":
                                same = tokens == expected if same is None else same and tokens == expected
                            rates.setdefault(f"llama_{t}", []).append(rate)
            load.append(os.getloadavg()[0])
            best = {k: max(v) for k, v in rates.items()}
            pairs = {d: sorted(a / b for a, b in zip(rates[f"ours_{d}"], rates[f"llama_{t}"]))
                     for d, t in (("fp32", "f32"), ("bf16", "bf16"))}
            ratio = {d: statistics.median(v) for d, v in pairs.items()}
            print(f"batch {batch}: ours fp32 {best['ours_fp32']:7.1f} tok/s  bf16 {best['ours_bf16']:7.1f} tok/s | "
                  f"llama.cpp f32 {best['llama_f32']:7.1f} tok/s  bf16 {best['llama_bf16']:7.1f} tok/s (best of "
                  f"{args.rounds}) | ours bf16 / llama.cpp bf16, median of {args.rounds} pairs {ratio['bf16']:.2f} "
                  f"({pairs['bf16'][0]:.2f}-{pairs['bf16'][-1]:.2f})  fp32 / f32 {ratio['fp32']:.2f} | load "
                  f"{load[0]:.1f} -> {load[1]:.1f} | llama.cpp f32 greedy tokens == ours: {same}")
            figures |= {f"b{batch}_{k}_tok_s": round(v, 1) for k, v in best.items()}
            figures[f"b{batch}_ratio_ours_bf16_vs_llama_bf16"] = round(ratio["bf16"], 2)
            figures[f"b{batch}_ratio_ours_bf16_vs_llama_bf16_range"] = [round(pairs["bf16"][0], 2),
                                                                       round(pairs["bf16"][-1], 2)]
            figures[f"b{batch}_ratio_ours_fp32_vs_llama_f32"] = round(ratio["fp32"], 2)
            figures[f"b{batch}_load_average"] = [round(x, 1) for x in load]
            figures[f"b{batch}_llama_f32_same_greedy_tokens"] = same
            for llm in llamas.values():
                llm.lib.llama_batch_free(llm.b)
                llm.llm.close()
        for dtype, (model, _, _) in models.items():
            for batch in args.batches:
                ms = {lean: min(step_ms(model, batch, lean) for _ in range(args.rounds)) for lean in (False, True)}
                print(f"decode_step {dtype} batch {batch}: module path {ms[False]:6.2f} ms  lean {ms[True]:6.2f} ms "
                      f"({ms[False] / ms[True]:.2f}x)")
                figures[f"step_{dtype}_b{batch}_module_ms"] = round(ms[False], 2)
                figures[f"step_{dtype}_b{batch}_lean_ms"] = round(ms[True], 2)
                figures[f"step_{dtype}_b{batch}_lean_speedup"] = round(ms[False] / ms[True], 2)
    return figures


def run(quick: bool = False) -> dict:
    """bench/run_all.py's entry: the 26m preset (tiny when quick), 1 thread, batch 1, 4, 8."""
    return measure("tiny" if quick else "26m", 1, 16 if quick else 48, (1, 4, 8), 1 if quick else 5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="26m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401  (only: is it installed?)
    except ImportError:
        print("bench_decode.py needs llama-cpp-python: bash script/setup.sh --with-llama-cpp", file=sys.stderr)
        return 2
    measure(args.preset, args.threads, args.new_tokens, args.batches, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
