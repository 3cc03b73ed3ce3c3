"""Benchmark: a full pretrain.py step (memmap mixture loader, bf16 autocast, AdamW, clipping, metrics) for the
26m preset on this CPU, against the same model trained in fp32 by a plain loop, measured in the same run.

Prints and returns tokens/s and MFU of both, their ratio (target >= 2x), and the fraction of the pretrain step
spent in data loading (target < 2%). The two alternate in blocks, so that the shared machine's changing load
falls on both. MFU is relative to this CPU's measured bf16 matmul peak (CPUs have no
datasheet figure to trust; see train_loop.peak_flops), so it reads as "share of what a big bf16 matmul gets".
The shards are real sample text (../shared/corpora-samples) tokenized by the real tokenize step with a
6,400-piece SentencePiece model (MiniMind's vocabulary size for this preset) trained on the same samples.

    python bench/bench_pretrain.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT.parent / "shared" / "corpora-samples"

import numpy as np   # noqa: E402
import torch         # noqa: E402


def _texts(limit_chars: int) -> dict[str, list[str]]:
    def jsonl(path, key):
        for line in open(path, encoding="utf-8"):
            if line.strip():
                yield json.loads(line)[key]

    def take(it):
        out, n = [], 0
        for t in it:
            if n >= limit_chars:
                break
            out.append(t)
            n += len(t)
        return out

    fever = [l.strip() for l in open(SAMPLES / "medicalgpt/pretrain/fever.txt", encoding="utf-8") if l.strip()]
    return {"wiki_zh": take(jsonl(SAMPLES / "skywork-zh-web/zh_general.jsonl", "text")),
            "medical_books": take("\n".join(fever[i:i + 5]) for i in range(0, len(fever), 5))}


def build_shards(root: Path, limit_chars: int):
    from data_process.records import write_parts
    from data_process.tokenize_docs import Settings, tokenize_corpus
    from data_process.train_tokenizer import train_sentencepiece
    from tokenizer import Tokenizer
    texts = _texts(limit_chars)
    lines = [l for ts in texts.values() for t in ts for l in t.split("\n") if l.strip()]
    tok = Tokenizer(train_sentencepiece(lines, 6400))
    tok_dir = tok.save(root / "tokenizer")
    for name, ts in texts.items():
        parts = write_parts(({"id": f"{name}:{i}", "corpus": name, "kind": "doc", "text": t} for i, t in enumerate(ts)),
                            root / "docs" / name)
        tokenize_corpus(name, parts, root / "docs", tok, tok_dir, root / "pretrain" / name,
                        Settings(val_fraction=0.02, shard_tokens=10_000_000), workers=1, progress=False)
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "schedule.toml").write_text('phases = ["bench"]\n[model]\npreset = "26m"\n[schedule]\n'
                                       'total_tokens = 1\npeak_lr = 1e-3\nmin_lr = 1e-4\n')
    (cfg / "bench.toml").write_text('tokens = 1\n[mixture]\nwiki_zh = 1.0\nmedical_books = 1.0\n')
    return tok, tok_dir, cfg


def plain_fp32_steps(model, tokens: np.ndarray, batch_size: int, seq_len: int, steps: int) -> list[float]:
    """nanoGPT's loop, fp32: random windows from one memmapped stream, forward, backward, clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))
        loss = model(w[:, :-1], targets=w[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def run(quick: bool = False, threads: int = 1) -> dict:
    import pretrain
    import train_loop
    from model import Transformer, make_config
    torch.set_num_threads(threads)
    batch_size, seq_len, steps_per_block = (2, 256, 2) if quick else (4, 512, 4)
    blocks = 2   # pretrain and baseline alternate, so a change in the machine's load hits both alike
    root = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    try:
        tok, tok_dir, cfg = build_shards(root, 150_000 if quick else 600_000)
        tokens_per_step = batch_size * seq_len
        (cfg / "bench.toml").write_text(f'tokens = {blocks * steps_per_block * tokens_per_step}\n[mixture]\n'
                                        f'wiki_zh = 1.0\nmedical_books = 1.0\n')
        peak = train_loop.peak_flops("cpu", "bf16")
        torch.manual_seed(1337)
        model = Transformer(make_config("26m", tok.vocab_size, max_seq_len=1024))
        flops_per_token = model.flops_per_token(seq_len)
        stream = np.concatenate([ds.tokens for c in ("wiki_zh", "medical_books")
                                 for ds in pretrain.open_corpus(root / "pretrain", c, tok.sha256, seq_len + 1).train])
        base_times, step_times, data_s = [], [], 0.0
        for block in range(blocks):
            # the baseline: a plain fp32 loop (the first step of each block pays for allocation: not timed)
            base_times += plain_fp32_steps(model, stream, batch_size, seq_len, steps_per_block + 1)[1:]
            # pretrain.py: this block's steps of the phase (the second block resumes the first's checkpoint;
            # the loop does not time the first step of a run)
            args = pretrain.parse_args([
                "--phase", "bench", "--config-dir", str(cfg), "--data-dir", str(root / "pretrain"),
                "--tokenizer", str(tok_dir), "--out-dir", str(root / "out"), "--preset", "26m",
                "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--grad-accum", "1", "--dtype", "bf16",
                "--eval-interval", "0", "--save-interval", "0", "--val-windows", "1", "--no-progress",
                "--max-steps", str((block + 1) * steps_per_block)])
            summary = pretrain.run_phase("bench", args, pretrain.load_schedule(cfg))
            timed = steps_per_block - 1
            step_times.append((summary["mean_step_s"], timed))
            data_s += summary["data_fraction"] * summary["mean_step_s"] * timed
        del model
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_timed = sum(n for _, n in step_times)
    step_s = sum(t * n for t, n in step_times) / n_timed
    base_step_s = float(np.mean(base_times))
    steps = n_timed

    result = {
        "preset": "26m", "batch_size": batch_size, "seq_len": seq_len, "threads": threads,
        "steps_timed": steps, "baseline_steps_timed": len(base_times),
        "pretrain_bf16_tokens_per_s": round(tokens_per_step / step_s, 1),
        "pretrain_bf16_mfu": round(flops_per_token * tokens_per_step / step_s / peak, 4),
        "data_loading_fraction": round(data_s / (step_s * n_timed), 5),
        "baseline_fp32_plain_tokens_per_s": round(tokens_per_step / base_step_s, 1),
        "baseline_fp32_plain_mfu": round(flops_per_token * tokens_per_step / base_step_s / peak, 4),
        "speedup_vs_fp32_plain": round(base_step_s / step_s, 2),
        "cpu_bf16_matmul_peak_gflops": round(peak / 1e9, 1),
    }
    print(f"pretrain.py step, 26m preset, batch {batch_size}x{seq_len}, bf16 autocast, {threads} thread(s):")
    print(f"  {result['pretrain_bf16_tokens_per_s']:,.1f} tokens/s, MFU {result['pretrain_bf16_mfu']:.1%} "
          f"(of the measured bf16 matmul peak {result['cpu_bf16_matmul_peak_gflops']} GFLOP/s)")
    print(f"  data loading: {result['data_loading_fraction']:.3%} of step time (target < 2%)")
    print(f"baseline, same model, fp32, plain loop: {result['baseline_fp32_plain_tokens_per_s']:,.1f} tokens/s, "
          f"MFU {result['baseline_fp32_plain_mfu']:.1%}")
    print(f"speedup: {result['speedup_vs_fp32_plain']:.2f}x (target >= 2x)")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller batch, fewer steps (< 60 s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads under contention "
                        "are erratic)")
    args = p.parse_args(argv)
    run(quick=args.quick, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
