"""Benchmark of SFT and DPO (issue 7), everything through train_loop.train as the real runs do.

On the Toyhom Chinese medical dialogue sample (7,644 real conversations, GB18030 CSV read by the issue-2
reader) with the ChatGLM2 tokenizer as the project prepares it:
  - padding fraction of SFT batches: length-bucketed (sft.SFTBatches) vs naive pad-to-max (MiniMind pads every
    example to the longest) and vs random batches padded to their own longest (target: bucketed < 10%)
  - SFT training throughput in real (non-padding) tokens/s, bucketed vs pad-to-max, same model, same steps
On the real preference samples (MedicalGPT medical reward pairs + dpo_zh_500):
  - DPO step time with the cached reference log-probs vs running the reference model every step, and the
    one-time cost of filling the cache

    python bench/bench_sft.py            # a wider model, more steps
    python bench/bench_sft.py --quick    # under a minute
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SAMPLES = Path(os.environ.get("CORPORA_SAMPLES", ROOT.parent / "shared" / "corpora-samples"))


def dialogue_set(tok, max_tokens: int):
    from data_process.readers import READERS
    import sft
    path = next((SAMPLES / "toyhom-medical-dialogue").glob("*.csv"))
    records = [r for r in READERS["medical_dialogue_csv"](path, "medical_dialogue") if isinstance(r, dict)]
    t = time.perf_counter()
    data = sft.tokenize_conversations(tok, [r["messages"] for r in records], max_tokens)
    return data, len(records) / (time.perf_counter() - t)


def preference_set(tok, max_tokens: int):
    from data_process.readers import READERS
    import dpo
    records = []
    for reader, name in (("medical_reward_jsonl", "medicalgpt/reward/medical_reward_pairs.jsonl"),
                         ("sharegpt_pref_jsonl", "medicalgpt/reward/dpo_zh_500.jsonl")):
        records += [r for r in READERS[reader](SAMPLES / name, name) if isinstance(r, dict)]
    return dpo.tokenize_pairs(tok, records, max_tokens)


def base_model(tok, quick: bool):
    from model import Transformer, make_config
    torch.manual_seed(0)
    # with the 64,796-token vocabulary the output layer dominates either way; the full run adds depth
    size = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192) if quick else \
        dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192)
    return Transformer(make_config("tiny", tok.vocab_size, max_seq_len=512, **size))


def train_for(model, tok, batches, steps: int, out_dir: Path, loss_fn=None) -> dict:
    """`steps` optimizer steps through the one loop (bf16 autocast, no eval, one final checkpoint)."""
    from train_loop import TrainConfig, train
    cfg = TrainConfig(out_dir=str(out_dir), total_steps=steps, batch_size=batches.batch_size, seq_len=512,
                      lr=1e-4, min_lr=1e-5, dtype="bf16", device="cpu", eval_interval=0, save_interval=0,
                      progress=False, resume=False, peak_flops=1e12)
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, model, tok, batches, loss_fn=loss_fn, meta={"kind": "sft", "stage": "bench"})


def real_tokens_per_s(batches, steps: int, summary: dict) -> float:
    """Non-padding tokens/s over the timed steps (the loop times steps 1.., the first pays for warm-up)."""
    real = [int(batches.lengths[batches.indices(s, 0)].sum()) for s in range(1, steps)]
    return float(np.mean(real)) / summary["mean_step_s"]


def run(quick: bool = False) -> dict:
    import dpo
    import sft
    from tokenizer import Tokenizer
    tok = Tokenizer.load(SAMPLES / "chatglm2-tokenizer" / "tokenizer.model")
    batch_size, max_tokens = (4 if quick else 16), 512
    data, convs_per_s = dialogue_set(tok, max_tokens)
    longest = int(data.lengths.max()) - 1
    bucketed = sft.SFTBatches(data, batch_size, tok.pad_id, seed=1)
    pad_to_max = sft.SFTBatches(data, batch_size, tok.pad_id, seed=1, bucket_batches=1, pad_multiple=longest)
    random_batches = sft.SFTBatches(data, batch_size, tok.pad_id, seed=1, bucket_batches=1, pad_multiple=1)
    figures = {"sft_examples": len(data), "sft_tokenize_convs_per_s": round(convs_per_s, 1),
               "sft_padding_bucketed": round(bucketed.padding_fraction(), 4),
               "sft_padding_pad_to_max": round(pad_to_max.padding_fraction(), 4),
               "sft_padding_random_batches": round(random_batches.padding_fraction(), 4)}
    print(f"SFT data: {len(data):,} Toyhom conversations, tokenized at {convs_per_s:,.0f} conv/s; "
          f"padding: bucketed {figures['sft_padding_bucketed']:.1%}, random batches "
          f"{figures['sft_padding_random_batches']:.1%}, pad-to-max {figures['sft_padding_pad_to_max']:.1%} "
          f"(target < 10%)")

    steps = 3 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = base_model(tok, quick)
        for name, batches in (("bucketed", bucketed), ("pad_to_max", pad_to_max)):
            summary = train_for(copy.deepcopy(model), tok, batches, steps, tmp / f"sft_{name}")
            figures[f"sft_real_tokens_per_s_{name}"] = round(real_tokens_per_s(batches, steps, summary), 1)
        figures["sft_speedup_vs_pad_to_max"] = round(figures["sft_real_tokens_per_s_bucketed"]
                                                     / figures["sft_real_tokens_per_s_pad_to_max"], 2)
        print(f"SFT train ({steps} steps, batch {batch_size}, bf16): real tokens/s bucketed "
              f"{figures['sft_real_tokens_per_s_bucketed']:,.0f} vs pad-to-max "
              f"{figures['sft_real_tokens_per_s_pad_to_max']:,.0f} -> {figures['sft_speedup_vs_pad_to_max']}x")

        pairs = preference_set(tok, 256 if quick else max_tokens).head(16 if quick else 64)
        dpo_batch = 4 if quick else 8
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            ref_logps = dpo.compute_reference_logps(model, pairs, tok.pad_id, batch_size=dpo_batch)
        figures["dpo_pairs"] = len(pairs)
        figures["dpo_cache_fill_s"] = round(time.perf_counter() - t, 2)
        for name in ("cached", "live_reference"):
            ref_model = None if name == "cached" else copy.deepcopy(model).eval().requires_grad_(False)
            batches = dpo.DPOBatches(pairs, dpo_batch, tok.pad_id, seed=1,
                                     ref_logps=ref_logps if name == "cached" else None)
            summary = train_for(copy.deepcopy(model), tok, batches, steps, tmp / f"dpo_{name}",
                                loss_fn=dpo.make_loss_fn(0.1, ref_model))
            figures[f"dpo_step_s_{name}"] = round(summary["mean_step_s"], 4)
        figures["dpo_speedup_cached"] = round(figures["dpo_step_s_live_reference"] / figures["dpo_step_s_cached"], 2)
        print(f"DPO ({len(pairs)} pairs, {dpo_batch} pairs/step, bf16): step {figures['dpo_step_s_cached']:.3f} s "
              f"with the reference cache vs {figures['dpo_step_s_live_reference']:.3f} s running the reference "
              f"-> {figures['dpo_speedup_cached']}x; filling the cache once took {figures['dpo_cache_fill_s']} s")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few steps (< 1 minute)")
    args = p.parse_args(argv)
    print(json.dumps(run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
