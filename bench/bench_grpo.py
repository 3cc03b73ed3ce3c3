"""Benchmark GRPO: rollout throughput with the batched engine vs one sequence at a time, and where a step's time goes.

    python bench/bench_grpo.py [--quick] [--preset 26m] [--threads 1]

1. Rollouts at G = 8: P prompts x 8 completions of exactly N new tokens (ignore_eos, so both sides generate the
   same number of tokens), sampled at temperature 1 with one seed per completion. Ours: engine.run_jobs (all
   P*G sequences in the engine's slots, one batched forward per token). Baseline, same run, same weights and
   seeds: Sampling.generate (model.generate, KV cache, batch 1) one completion after another. Best of 2 each
   (the machine is shared). The share of completions whose tokens agree exactly is printed (batched decoding is
   equal up to float rounding, so a few may part ways late).
2. A GRPO step on the synthetic task (grpo.synthetic_choice_items, choice reward, beta > 0 so the reference
   forward is timed too), through train_loop: rollout, reference, reward and policy forward+backward seconds
   (step_s - data_s) as the loop logs them, averaged over the steps after the first; train_loop's tokens/s and
   MFU (input tokens and model FLOPs over the whole step, rollouts included), the figures to read on a GPU.
The tokenizer is trained by the project's own trainer at its default size on the real samples, as bench_serve.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import train_tokenizer  # noqa: E402  (the same tokenizer on the same real text)


def make_model(preset: str, tok, max_seq_len: int, device: str):
    from model import Transformer, make_config
    torch.manual_seed(0)
    return Transformer(make_config(preset, tok.vocab_size, max_seq_len=max_seq_len)).eval().to(device)


def bench_rollouts(model, tok, prompts_n: int, group: int, new_tokens: int) -> dict:
    import grpo
    from engine import Engine
    from inference import Sampling
    items = grpo.synthetic_choice_items(prompts_n, seed=0)
    prompts = [tok.render_chat(it["prompt"], add_generation_prompt=True).ids for it in items for _ in range(group)]
    samplings = [Sampling(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=s,
                          ignore_eos=True) for s in range(len(prompts))]
    engine = Engine(model, tok, max_active=len(prompts))
    n_tokens = len(prompts) * new_tokens
    batched_s, single_s = [], []
    batched = single = None
    for _ in range(2):
        t0 = time.perf_counter()
        batched = grpo.sample_completions(engine, tok, prompts, samplings)
        batched_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            single = [list(s.generate(model, p, [])) for p, s in zip(prompts, samplings)]
        single_s.append(time.perf_counter() - t0)
    assert all(len(c.tokens) == new_tokens for c in batched) and all(len(s) == new_tokens for s in single)
    same = float(np.mean([c.tokens == s for c, s in zip(batched, single)]))
    ours, base = n_tokens / min(batched_s), n_tokens / min(single_s)
    print(f"rollouts: {prompts_n} prompts x G={group} x {new_tokens} new tokens ({n_tokens:,} tokens): batched "
          f"{ours:,.0f} tokens/s ({min(batched_s):.2f} s), one at a time {base:,.0f} tokens/s ({min(single_s):.2f} s)"
          f" -> {ours / base:.2f}x; completions identical to one-at-a-time: {same:.0%}")
    return {"rollout_tokens_per_s": round(ours, 1), "rollout_one_at_a_time_tokens_per_s": round(base, 1),
            "rollout_speedup": round(ours / base, 2), "rollout_identical_share": round(same, 3),
            "rollout_sequences": len(prompts), "rollout_new_tokens": new_tokens}


def bench_step(tmp: Path, tok, preset: str, device: str, steps: int, prompts_n: int, group: int,
               new_tokens: int) -> dict:
    import grpo
    from checkpoint import save_checkpoint
    from rewards import RewardSpec
    from train_loop import read_jsonl
    model = make_model(preset, tok, 256, "cpu")
    init = save_checkpoint(tmp / "init", model, tok, {"kind": "sft", "step": 0, "tokens_seen": 0, "chat": True})
    data = tmp / "rl.jsonl"
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n"
                            for it in grpo.synthetic_choice_items(64, seed=1)), encoding="utf-8")
    cfg = grpo.GRPOConfig(name="bench", data=[str(data)], init_from=str(init), out_dir=str(tmp / "run"),
                          group_size=group, max_new_tokens=new_tokens, beta=0.04, mask_truncated=False,
                          reward=[RewardSpec("choice"), RewardSpec("length", weight=0.1, target_tokens=8)],
                          train={"batch_size": prompts_n, "total_steps": steps, "lr": 1e-5, "min_lr": 1e-5,
                                 "dtype": "bf16", "device": device, "eval_interval": 0, "save_interval": 0,
                                 "progress": False, "seed": 1})
    grpo.run_grpo(cfg)
    records = [r for r in read_jsonl(tmp / "run" / "metrics.jsonl") if "loss" in r][1:]   # after the first
    mean = {k: float(np.mean([r[k] for r in records])) for k in
            ("step_s", "data_s", "rollout_s", "reference_s", "reward_s", "tokens_per_s", "mfu", "completion_len")}
    policy_s = mean["step_s"] - mean["data_s"]
    other_s = mean["data_s"] - mean["rollout_s"] - mean["reference_s"] - mean["reward_s"]
    print(f"GRPO step ({preset}, {prompts_n} prompts x G={group}, up to {new_tokens} new tokens, mean completion "
          f"{mean['completion_len']:.0f}, {device}, bf16): {mean['step_s']:.2f} s = rollout {mean['rollout_s']:.2f} + "
          f"reference {mean['reference_s']:.2f} + reward {mean['reward_s']:.3f} + policy fwd/bwd {policy_s:.2f} + "
          f"other {other_s:.3f}; train_loop's tokens/s and MFU over the whole step: {mean['tokens_per_s']:,.0f}, "
          f"{mean['mfu']:.1%}")
    return {"step_s": round(mean["step_s"], 3), "step_rollout_s": round(mean["rollout_s"], 3),
            "step_reference_s": round(mean["reference_s"], 3), "step_reward_s": round(mean["reward_s"], 4),
            "step_policy_fwd_bwd_s": round(policy_s, 3), "step_other_s": round(other_s, 4),
            "update_tokens_per_s": round(mean["tokens_per_s"], 1), "update_mfu": round(mean["mfu"], 4),
            "step_preset": preset, "step_device": device}


def run(quick: bool = False, preset: str | None = None, threads: int = 1, device: str = "auto") -> dict:
    from train_loop import resolve_device
    device = resolve_device(device)
    if device == "cpu":
        torch.set_num_threads(threads)
    preset = preset or ("tiny" if quick else "26m")
    tok = train_tokenizer()
    model = make_model(preset, tok, 256, device)
    new_tokens = 16 if quick else 64
    out = {"preset": preset, "device": device, "threads": threads if device == "cpu" else None}
    out.update(bench_rollouts(model, tok, prompts_n=2 if quick else 4, group=8, new_tokens=new_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        out.update(bench_step(Path(tmp), tok, preset, device, steps=3 if quick else 5, prompts_n=2 if quick else 4,
                              group=8, new_tokens=new_tokens))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", help="model preset (default 26m; tiny with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    print(json.dumps(run(args.quick, args.preset, args.threads, args.device), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
