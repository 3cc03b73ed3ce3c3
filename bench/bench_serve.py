"""Benchmark inference: our decode vs transformers' on the exported model, and the server under 8 clients.

    python bench/bench_serve.py [--quick]

1. Decode tokens/s at batch 1 (greedy, fp32, the same CPU threads, the same run): our `Transformer.generate`
   against `transformers`' `generate` on the folder export.py wrote from the same checkpoint (random init), for
   the tiny and 26m presets. Runs alternate ours/theirs and the best of each is kept (the machine is shared).
   Decode rate = tokens after the first / time after the first (prefill excluded), timed by a streamer in both.
   Both must produce the same tokens (checked), so the comparison is like for like.
2. serve.py as a subprocess with 8 concurrent streaming clients (openai's AsyncOpenAI): total completion
   tokens/s, p50 latency and p50 time to first token; baseline: one client alone on the same server, same run.
The tokenizer is trained here by tokenizer.train_sentencepiece at its default size, on the real samples.
Torch threads: 1 by default (--threads): on this shared 2-core machine, 2 intra-op threads at batch 1 spend their
time waiting for each other (tiny decode measured 20x slower under load); ours and transformers get the same.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT.parent / "shared" / "corpora-samples"


def train_tokenizer():
    """The project's own trainer (tokenizer.train_sentencepiece) at its default size, on real sample text."""
    from data_process.train_tokenizer import DEFAULT_VOCAB_SIZE, train_sentencepiece
    from tokenizer import Tokenizer
    lines = [l for l in (SAMPLES / "medicalgpt/pretrain/fever.txt").read_text(encoding="utf-8").splitlines() if l]
    lines += [json.loads(l)["text"] for l in open(SAMPLES / "skywork-zh-web/zh_general.jsonl", encoding="utf-8")]
    return Tokenizer(train_sentencepiece(lines, DEFAULT_VOCAB_SIZE))


def make_checkpoint(out_dir: Path, preset: str, tok, **overrides) -> Path:
    from model import Transformer, make_config
    from checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = Transformer(make_config(preset, tok.vocab_size, **overrides))
    with torch.no_grad():   # scaled up so greedy decoding wanders instead of repeating one token
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return save_checkpoint(out_dir, model, tok, {"step": 0, "tokens_seen": 0, "kind": "sft", "chat": True})


class _Timer:
    """Token timestamps for transformers' generate (its streamer API: put() gets the prompt, then each token)."""

    def __init__(self):
        self.times, self.tokens, self._prompt_seen = [], [], False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(value.flatten().tolist())

    def end(self):
        pass


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def ours(model, prompt, n) -> tuple[float, list[int]]:
    times, tokens = [], []
    for t in model.generate(prompt, max_new_tokens=n, temperature=0, stop_ids=()):
        times.append(time.perf_counter())
        tokens.append(t)
    return decode_rate(times), tokens


def theirs(hf_model, prompt, n) -> tuple[float, list[int]]:
    timer = _Timer()
    with torch.inference_mode():
        hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          streamer=timer, pad_token_id=0, eos_token_id=None, temperature=None, top_p=None,
                          repetition_penalty=1.0)   # the exported generation_config says 1.1; greedy here
    return decode_rate(timer.times), timer.tokens


def bench_decode(preset: str, tok, work: Path, n_new: int, rounds: int) -> dict:
    from inference import load_model
    from export import export
    from transformers import AutoModelForCausalLM
    ckpt = make_checkpoint(work / f"ckpt-{preset}", preset, tok)
    hf_dir = export(ckpt, work / f"hf-{preset}")
    model, _, _ = load_model(ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None   # decode exactly n tokens, as ours with no stop ids
    prompt = tok.encode("患者，男，45岁，因反复咳嗽、咳痰3年，加重伴发热1周入院。请给出诊断思路：")
    ours(model, prompt, 4), theirs(hf_model, prompt, 4)   # warm-up
    our_rates, their_rates = [], []
    for _ in range(rounds):
        rate, our_tokens = ours(model, prompt, n_new)
        our_rates.append(rate)
        rate, their_tokens = theirs(hf_model, prompt, n_new)
        their_rates.append(rate)
    same = our_tokens == their_tokens
    result = {f"decode_{preset}_ours_tok_s": round(max(our_rates), 1),
              f"decode_{preset}_transformers_tok_s": round(max(their_rates), 1),
              f"decode_{preset}_ratio_ours_vs_transformers": round(max(our_rates) / max(their_rates), 2),
              f"decode_{preset}_same_tokens": same}
    print(f"decode {preset:>4} ({model.num_params() / 1e6:.1f}M params, vocab {tok.vocab_size}, {n_new} new tokens,"
          f" {torch.get_num_threads()} threads): ours {max(our_rates):7.1f} tok/s   transformers "
          f"{max(their_rates):7.1f} tok/s   ratio {max(our_rates) / max(their_rates):.2f}   same tokens: {same}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_one(client, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.8,
        seed=len(question), stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


async def clients(url: str, n_clients: int, max_tokens: int) -> dict:
    import openai
    questions = [f"第{i}个问题：发烧{i}天了，咳嗽，应该怎么办？" for i in range(n_clients)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, q, max_tokens) for q in questions))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in results) / wall,
            "p50_latency_s": statistics.median(r["latency"] for r in results),
            "p50_ttft_s": statistics.median(r["ttft"] for r in results)}


def bench_server(ckpt: Path, max_tokens: int, threads: int) -> dict:
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), str(ckpt), "--port", str(port),
                             "--model-name", "bench", "--threads", str(threads)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise RuntimeError("serve.py did not start") from None
                time.sleep(0.3)
        asyncio.run(clients(url, 1, 8))   # warm-up
        alone = asyncio.run(clients(url, 1, max_tokens))
        eight = asyncio.run(clients(url, 8, max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"server, 8 concurrent streams x {max_tokens} tokens: {eight['tok_s']:.1f} tok/s total, p50 latency "
          f"{eight['p50_latency_s']:.2f} s, p50 first token {eight['p50_ttft_s']:.2f} s | one client alone: "
          f"{alone['tok_s']:.1f} tok/s, latency {alone['p50_latency_s']:.2f} s | ratio {eight['tok_s'] / alone['tok_s']:.2f}")
    return {"server_8_clients_tok_s": round(eight["tok_s"], 1),
            "server_8_clients_p50_latency_s": round(eight["p50_latency_s"], 2),
            "server_8_clients_p50_ttft_s": round(eight["p50_ttft_s"], 2),
            "server_1_client_tok_s": round(alone["tok_s"], 1),
            "server_ratio_8_vs_1_client": round(eight["tok_s"] / alone["tok_s"], 2)}


def run(quick: bool = False, threads: int = 1) -> dict:
    n_new, rounds, server_tokens = (32, 2, 24) if quick else (128, 3, 96)
    torch.set_num_threads(threads)
    results = {"threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = train_tokenizer()
        for preset in ("tiny", "26m"):
            results |= bench_decode(preset, tok, work, n_new, rounds)
        results |= bench_server(work / "ckpt-26m", server_tokens, threads)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and rounds (< 60 s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides and the server")
    args = p.parse_args(argv)
    print(json.dumps(run(quick=args.quick, threads=args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
