"""Benchmark model.py on this machine: matmul peaks, training throughput + MFU, decode with/without KV cache.

    python bench/bench_model.py [--quick]

1. bf16 and fp32 matmul peaks (GFLOP/s, all cores), the denominators of MFU.
2. Forward+backward+AdamW training tokens/s and MFU for the tiny and 26m presets, fp32 and bf16 autocast.
3. The issue's reference shape (6 layers, 384 wide, 32K vocab, batch 8x256), ours against a plain nanoGPT
   model (written out below, as in nanoGPT's model.py) trained by the same loop in the same run -> ratio.
4. What limits it: time of lm_head+loss, attention, the optimizer step, as shares of one training step.
5. Decode tokens/s at batch 1: KV cache vs recomputing the whole prefix every token.
MFU uses model.flops_per_token (PaLM appendix B, 6N + 12*L*H*Q*T, as nanoGPT's estimate_mfu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import ModelConfig, Transformer, make_config  # noqa: E402

VOCAB_26M = 8000   # the recipe's default tokenizer size


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)   # the machine is shared: the best run is the least disturbed one


def matmul_peak_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: a @ b, repeats) / 1e9


# ---- a plain nanoGPT model (Karpathy's model.py, without dropout/generation), the baseline ----------------
class NanoBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, block_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(NanoBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ---- training throughput ------------------------------------------------------------------------------------
def train_tokens_per_s(model: nn.Module, batch: int, seq_len: int, vocab: int, dtype: str, steps: int) -> float:
    """The nanoGPT loop: autocast forward, backward, clip, AdamW step, zero_grad. Best step time."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    x = torch.randint(0, vocab, (batch, seq_len + 1))
    inputs, targets = x[:, :-1], x[:, 1:]
    model.train()

    def step():
        with autocast(dtype):
            out = model(inputs, targets)
        loss = out[1] + (out[2] if len(out) > 2 else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq_len / best_time(step, steps)


def limits(model: Transformer, batch: int, seq_len: int, dtype: str, repeats: int) -> dict:
    """Where a training step goes: lm_head + loss (fwd+bwd), attention (SDPA fwd+bwd), optimizer step."""
    cfg = model.config
    torch.manual_seed(0)
    h = torch.randn(batch, seq_len, cfg.dim, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    from model import lm_loss

    def head():
        with autocast(dtype):
            loss = lm_loss(model.lm_head(model.model.norm(h)), targets)
        loss.backward()
        h.grad = None

    q = torch.randn(batch, cfg.n_heads, seq_len, cfg.head_dim, requires_grad=True)
    k = torch.randn(batch, cfg.n_heads, seq_len, cfg.head_dim, requires_grad=True)
    v = torch.randn(batch, cfg.n_heads, seq_len, cfg.head_dim, requires_grad=True)
    if dtype == "bf16":   # under autocast the projections hand SDPA bf16 tensors
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    t_head = best_time(head, repeats)
    t_attn = best_time(attention, repeats) * cfg.n_layers
    t_opt = best_time(opt.step, repeats)
    for p in params:
        p.grad = None
    return {"lm_head_loss_s": t_head, "attention_s": t_attn, "optimizer_s": t_opt}


# ---- decode --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def decode_tokens_per_s(model: Transformer, prompt_len: int, new_tokens: int, use_cache: bool) -> float:
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    t0 = time.perf_counter()
    if use_cache:
        n = sum(1 for _ in model.generate(prompt, max_new_tokens=new_tokens, temperature=0))
    else:   # recompute the whole prefix for every token (what a model without a cache does)
        ids = list(prompt)
        for _ in range(new_tokens):
            h, _ = model._hidden(torch.tensor([ids]))
            ids.append(int(model.lm_head(h[:, -1]).argmax()))
        n = new_tokens
    return n / (time.perf_counter() - t0)


def run(quick: bool = False) -> dict:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    steps = 2 if quick else 5
    res: dict = {"threads": threads}

    res["peak_fp32_gflops"] = matmul_peak_gflops(torch.float32, 1024 if quick else 2048, 3 if quick else 5)
    res["peak_bf16_gflops"] = matmul_peak_gflops(torch.bfloat16, 1024 if quick else 2048, 3 if quick else 5)
    peaks = {"fp32": res["peak_fp32_gflops"], "bf16": res["peak_bf16_gflops"]}
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"({threads} threads)")

    # presets
    for preset, batch, seq_len in [("tiny", 8, 256), ("26m", 4 if quick else 8, 256)]:
        torch.manual_seed(0)
        model = Transformer(make_config(preset, VOCAB_26M if preset == "26m" else 4000))
        for dtype in ("fp32", "bf16"):
            tps = train_tokens_per_s(model, batch, seq_len, model.config.vocab_size, dtype, steps)
            mfu = tps * model.flops_per_token(seq_len) / (peaks[dtype] * 1e9)
            res[f"train_{preset}_{dtype}_tok_s"] = tps
            res[f"train_{preset}_{dtype}_mfu"] = mfu
            print(f"train {preset:5s} {dtype}: {tps:8.0f} tok/s  MFU {100 * mfu:5.1f}% of {dtype} peak "
                  f"(batch {batch}x{seq_len}, {model.num_params() / 1e6:.1f}M params)")

    # the reference shape: 6 x 384, 32K vocab, 8 x 256, ours vs nanoGPT in the same loop
    ref = ModelConfig(vocab_size=32000, dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024,
                      max_seq_len=256, tie_embeddings=True)   # SwiGLU 3x1024 = nanoGPT's 2x1536 MLP params
    batch, seq_len = (4 if quick else 8), 256
    torch.manual_seed(0)
    ours = Transformer(ref)
    nano = NanoGPT(ref.vocab_size, ref.dim, ref.n_layers, ref.n_heads, seq_len)
    for dtype in ("fp32", "bf16"):
        t_ours = train_tokens_per_s(ours, batch, seq_len, ref.vocab_size, dtype, steps)
        t_nano = train_tokens_per_s(nano, batch, seq_len, ref.vocab_size, dtype, steps)
        mfu = t_ours * ours.flops_per_token(seq_len) / (peaks[dtype] * 1e9)
        res.update({f"ref_{dtype}_tok_s": t_ours, f"ref_{dtype}_nanogpt_tok_s": t_nano,
                    f"ref_{dtype}_ratio_vs_nanogpt": t_ours / t_nano, f"ref_{dtype}_mfu": mfu})
        print(f"reference 6x384 32K vocab {batch}x{seq_len} {dtype}: ours {t_ours:.0f} tok/s, nanoGPT {t_nano:.0f} "
              f"tok/s, ratio {t_ours / t_nano:.2f}, MFU {100 * mfu:.1f}% (issue: nanoGPT ~850 fp32 / ~1750 bf16)")
    res["ref_bf16_over_fp32"] = res["ref_bf16_tok_s"] / res["ref_fp32_tok_s"]
    step_s = batch * seq_len / res["ref_bf16_tok_s"]
    parts = limits(ours, batch, seq_len, "bf16", steps)
    for name, secs in parts.items():
        res[f"ref_bf16_{name.removesuffix('_s')}_share"] = secs / step_s
    print("  bf16 step %.3f s: lm_head+loss %.0f%%, attention %.0f%%, AdamW %.0f%%, rest (projections, MLP, "
          "norms, RoPE) %.0f%%; lm_head is %.0f%% of the FLOPs" % (
              step_s, *(100 * parts[k] / step_s for k in parts),
              100 * (1 - sum(parts.values()) / step_s),
              100 * 6 * ref.vocab_size * ref.dim / ours.flops_per_token(seq_len)))

    # decode at batch 1
    torch.manual_seed(0)
    model = Transformer(make_config("26m", VOCAB_26M))
    new = 32 if quick else 128
    with_cache = decode_tokens_per_s(model, 64, new, True)
    without = decode_tokens_per_s(model, 64, new, False)
    res.update({"decode_26m_cache_tok_s": with_cache, "decode_26m_nocache_tok_s": without,
                "decode_cache_speedup": with_cache / without})
    print(f"decode 26m batch 1 (prompt 64, {new} new, fp32): KV cache {with_cache:.0f} tok/s, "
          f"recompute {without:.0f} tok/s, speedup {with_cache / without:.1f}x")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats (< 60 s)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    res = run(quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
