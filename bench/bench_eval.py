"""Evaluation throughput: C-Eval/CMMLU questions per second for the ~26m preset on this CPU.

Scores the real medical subjects in ../shared/corpora-samples (random-init weights: speed does not depend on
what the model knows), 0-shot and 5-shot, in bf16 autocast and in fp32 (eval.py's default since fp32 and bf16
disagree on a few close choices), against a baseline in the same run that computes the full [B, T, V] logits and
log-softmax of one row per option (what a plain `model(x).logits` scorer does); ours runs the shared context once
and projects only the answer position onto the vocabulary.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402
from model import Transformer, make_config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "corpora-samples"


@torch.no_grad()
def naive_logprobs(model, requests, dtype=torch.float32, batch_size=8):
    """Baseline scorer: one row per option (context + letter), full [B, T, V] logits, then pick the letter's."""
    pairs = [(ctx, c) for ctx, conts in requests for c in conts]
    flat = []
    for start in range(0, len(pairs), batch_size):
        rows = [list(ctx) + list(c) for ctx, c in pairs[start:start + batch_size]]
        inp = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)
        for j, r in enumerate(rows):
            inp[j, : len(r) - 1] = torch.tensor(r[:-1])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logp = F.log_softmax(model(inp).logits.float(), dim=-1)
        for j, r in enumerate(rows):
            k = len(pairs[start + j][1])
            flat.append(logp[j, torch.arange(len(r) - 1 - k, len(r) - 1), torch.tensor(r[-k:])].sum().item())
    it = iter(flat)
    return [[next(it) for _ in conts] for _, conts in requests]


def timed_mc(model, tok, bench, shots, scorer=None, dtype=torch.bfloat16) -> float:
    original = ev.option_logprobs
    if scorer is not None:
        ev.option_logprobs = scorer
    try:
        t = time.perf_counter()
        r = ev.run_mc(model, tok, bench, shots, chat=False, dtype=dtype)
        return r["overall"]["n"] / (time.perf_counter() - t)
    finally:
        ev.option_logprobs = original


def run(quick: bool = False) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = Tokenizer.load(SAMPLES / "chatglm2-tokenizer" / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(make_config("26m", tok.vocab_size)).eval()
    bench = ev.load_benchmark(SAMPLES / "cmmlu-medical")
    per_subject = 4 if quick else 20
    for sub in bench.subjects.values():
        sub.questions = sub.questions[:per_subject]
    n = bench.n_questions
    print(f"26m preset ({model.num_params() / 1e6:.1f}M params, vocab {tok.vocab_size}), {n} CMMLU questions "
          f"(split {bench.split}, CMMLU prompt format)")
    figures = {"params_m": round(model.num_params() / 1e6, 1), "questions": n}
    for shots in (0, 5):
        ours = timed_mc(model, tok, bench, shots)
        ours_fp32 = timed_mc(model, tok, bench, shots, dtype=torch.float32)
        naive = timed_mc(model, tok, bench, shots, scorer=naive_logprobs)
        print(f"{shots}-shot: {ours:.2f} questions/s bf16, {ours_fp32:.2f} fp32 (one pass per question, logits "
              f"only where scored) vs {naive:.2f} bf16 (a pass per option, full logits) = {ours / naive:.2f}x; "
              f"fp32 costs {ours / ours_fp32:.2f}x bf16's time")
        figures[f"questions_per_s_{shots}shot"] = round(ours, 2)
        figures[f"questions_per_s_fp32_{shots}shot"] = round(ours_fp32, 2)
        figures[f"speedup_vs_full_logits_{shots}shot"] = round(ours / naive, 2)
    return figures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    print(run(p.parse_args().quick))
