"""The model: a LLaMA-style decoder-only transformer with an optional mixture-of-experts feed-forward.

RMSNorm (in fp32, as Hugging Face does), rotary position embeddings (HF's rotate_half convention),
grouped-query attention through F.scaled_dot_product_attention, SwiGLU, no biases, optional tied
embeddings. Parameter names are Hugging Face LlamaForCausalLM's (MoE layers: Mixtral's
`block_sparse_moe.gate` / `block_sparse_moe.experts.{j}.w1,w2,w3`, experts stored one module each, so no
re-stacking is needed), so export is a copy of the state dict. An optional shared expert is
`block_sparse_moe.shared_expert.{gate,up,down}_proj` (Qwen2-MoE's name; Mixtral has none).

Used by pretrain/sft/dpo (forward -> ModelOutput(logits, loss, aux_loss)), chat (generate streams
token ids through a preallocated KV cache), serve (decode_step: concurrent requests in one batched forward,
one SlotCache slot each) and export (save_pretrained: model.safetensors + config.json).
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import bf16_gemv


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int                 # SwiGLU hidden size (per expert for MoE)
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    n_experts: int = 0           # 0 = dense feed-forward; >0 = routed experts per layer
    n_experts_per_tok: int = 2   # top-k; k>1 renormalizes the k weights (Mixtral), k=1 keeps p (Switch)
    n_shared_experts: int = 0    # always-on experts (DeepSeekMoE), one SwiGLU of n_shared * ffn_dim
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok {self.n_experts_per_tok} not in 1..{self.n_experts}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}")
        return cls(**d)


# SwiGLU hidden sizes are ~8/3 * dim rounded to a multiple of 64 (LLaMA). "26m" and "100m" are MiniMind2's
# small and base geometries (parameter counts quoted for a 6400 vocabulary); "26m" and "deep" are the
# shallow-wide / deep-narrow pair (same width, 8 vs 24 layers; MobileLLM argues deep-narrow wins at this size).
# "moe": 8 fine-grained experts, top-2, each half the 26m FFN -> the same active FLOPs as 26m, ~3x its params.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    "26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=1024),
    "100m": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, ffn_dim=2048, max_seq_len=2048),
    "deep": dict(dim=512, n_layers=24, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=1024),
    "moe": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=704, max_seq_len=1024,
                n_experts=8, n_experts_per_tok=2),
}


def make_config(preset: str, vocab_size: int, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], "vocab_size": vocab_size, **overrides})


class ModelOutput(NamedTuple):
    logits: torch.Tensor            # [B, T, V]
    loss: torch.Tensor | None       # LM loss (see lm_loss)
    aux_loss: torch.Tensor          # MoE load-balancing loss, already times aux_loss_coef; 0 for dense


class TokenNLL(torch.autograd.Function):
    """Per-row -log softmax(logits)[target] in fp32, from logits of any dtype. Same values as F.cross_entropy,
    but it saves only the logits and the log-sum-exp (no fp32 log_softmax of [N, V]) and works through the rows
    in blocks whose fp32 temporaries stay in cache: on a 32K vocabulary the loss is ~1.5x (fp32) to ~2.5x
    (bf16 logits) faster on CPU than F.cross_entropy, and 4 bytes per logit lighter."""

    @staticmethod
    def forward(ctx, logits, targets):   # logits [N, V], targets [N] (valid ids; masking is the caller's)
        ctx.rows = 64 if logits.device.type == "cpu" else 8192   # GPUs want few, large kernels
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for i in range(0, len(logits), ctx.rows):
            lse[i:i + ctx.rows] = torch.logsumexp(logits[i:i + ctx.rows].float(), dim=-1)
        nll = lse - logits.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(logits, lse, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, lse, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, len(logits), ctx.rows):
            rows = slice(i, i + ctx.rows)
            p = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_()   # softmax
            p.scatter_add_(1, targets[rows, None], p.new_full((len(p), 1), -1.0))     # - onehot
            grad[rows] = p.mul_(grad_nll[rows, None])
        return grad, None


def lm_loss(logits, targets, loss_weights=None) -> torch.Tensor:
    """Cross-entropy in fp32. Unweighted: mean over targets != -100. Weighted: sum(w * nll) / sum(w) over
    targets != -100 (those contribute nothing, whatever their weight). No counted target -> 0, not NaN."""
    targets = targets.flatten()
    if ((targets < 0) & (targets != -100)).any():
        raise ValueError("targets must be token ids or -100 (ignored)")
    nll = TokenNLL.apply(logits.flatten(0, 1), targets.clamp_min(0))
    valid = (targets != -100).to(nll.dtype)
    w = valid if loss_weights is None else loss_weights.flatten().to(nll.dtype) * valid
    return (nll * w).sum() / w.sum().clamp_min(1e-8)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, cast back before the weight: exactly HF LlamaRMSNorm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in HF's layout (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; cos/sin [T, D] (RoFormer, in HF LLaMA's rotate_half convention)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_heads, max_len, head_dim], written in place.
    Allocated on first write with the dtype the keys come in (fp32, or bf16 under autocast)."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k, v, start_pos: int):
        B, H, T, D = k.shape
        if start_pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {start_pos + T} positions > {self.max_len}")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, start_pos:start_pos + T] = k
        self.v[layer][:, :, start_pos:start_pos + T] = v
        return self.k[layer][:, :, :start_pos + T], self.v[layer][:, :, :start_pos + T]


class Rows(NamedTuple):
    """Per-row positions of a batched decode step (SlotCache): row b's one new token sits at positions[b] and
    attends to keys 0..positions[b] (mask [B, 1, 1, length], length = max position + 1); index = arange(B), made
    once per step (None: update_rows makes it)."""
    positions: torch.Tensor
    mask: torch.Tensor
    length: int
    index: torch.Tensor | None = None


class SlotCache:
    """Keys/values of independent sequences decoded together (the server's concurrent requests): slot i holds
    one sequence, [n_slots, n_kv_heads, capacity, head_dim] per layer. The caller keeps its live sequences in
    slots 0..n-1 (`move` fills a freed slot), so a step reads views of the cache and never gathers rows.
    Capacity grows on demand up to max_len, so idle slots cost nothing until a long request arrives."""

    def __init__(self, model: "Transformer", n_slots: int, dtype: torch.dtype | None = None):
        cfg = model.config
        self.n_slots, self.max_len, self.capacity = n_slots, cfg.max_seq_len, 0
        self.shape = (n_slots, cfg.n_kv_heads, cfg.head_dim)
        # on a CPU in fp32 whatever the weights (as llama.cpp's default): CPU attention in bf16 is 2-5x slower
        self.dtype = dtype or (torch.float32 if model.lm_head.weight.device.type == "cpu" else model.lm_head.weight.dtype)
        self.device = model.lm_head.weight.device
        self.k = [self._empty(0) for _ in range(cfg.n_layers)]
        self.v = [self._empty(0) for _ in range(cfg.n_layers)]
        self.decoder = None   # the batch-1 TokenDecoder over slot 0 (Transformer._bound_decoder), made on first use

    def _empty(self, length: int) -> torch.Tensor:
        n, h, d = self.shape
        return torch.zeros(n, h, length, d, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, at most max_len)."""
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: {length} positions > {self.max_len}")
        if length <= self.capacity:
            return
        new = min(self.max_len, max(length, 2 * self.capacity, 64))
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                grown = self._empty(new)
                grown[:, :, :self.capacity] = old
                cache[i] = grown
        self.capacity = new

    def slot(self, i: int) -> KVCache:
        """A batch-1 KVCache writing straight into slot i (for the prefill of a new sequence)."""
        view = KVCache(len(self.k), 1, self.capacity)
        view.k = [k[i:i + 1] for k in self.k]
        view.v = [v[i:i + 1] for v in self.v]
        return view

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst."""
        for cache in (self.k, self.v):
            for t in cache:
                t[dst, :, :length] = t[src, :, :length]

    def update_rows(self, layer: int, k, v, rows: Rows):
        """Write row b's new key/value (k, v [B, H, 1, D]) at rows.positions[b] of slot b; -> the keys and
        values of slots 0..B-1 up to rows.length (views)."""
        B = k.shape[0]
        if B == 1:   # one row at position length - 1: a plain copy (index_put costs ~2x more)
            self.k[layer][0, :, rows.length - 1] = k[0, :, 0]
            self.v[layer][0, :, rows.length - 1] = v[0, :, 0]
        else:
            index = torch.arange(B, device=k.device) if rows.index is None else rows.index
            self.k[layer][index, :, rows.positions] = k[:, :, 0].to(self.dtype)
            self.v[layer][index, :, rows.positions] = v[:, :, 0].to(self.dtype)
        return self.k[layer][:B, :, :rows.length], self.v[layer][:B, :, :rows.length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if isinstance(start_pos, Rows):   # a batched decode step: one token per row, each at its own position
            k, v = cache.update_rows(layer, k, v, start_pos)
            mask, causal = start_pos.mask, False
        elif cache is not None:
            k, v = cache.update(layer, k, v, start_pos)
            if T == 1:          # one new query sees every cached position
                causal = False
            elif start_pos > 0:  # a chunk after a prefix: is_causal would align top-left, so build the mask
                S = start_pos + T
                mask = torch.arange(S, device=x.device)[None, :] <= (start_pos + torch.arange(T, device=x.device))[:, None]
                causal = False
        if k.dtype != q.dtype:   # a SlotCache kept in fp32 under bf16 weights: attend in the weights' dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        # GQA: kv head j serves query heads j*rep..(j+1)*rep-1 (HF repeat_kv). SDPA's enable_gqa does that without
        # copies in the CPU kernel and CUDA flash (bf16/fp16, no mask); elsewhere it would fall back to the slow
        # math kernel, so expand there.
        gqa = self.n_kv_heads != self.n_heads
        native_gqa = gqa and (x.device.type == "cpu" or (q.dtype in (torch.float16, torch.bfloat16) and mask is None))
        if gqa and not native_gqa:
            rep = self.n_heads // self.n_kv_heads
            k = k[:, :, None].expand(B, self.n_kv_heads, rep, k.shape[2], self.head_dim).reshape(B, self.n_heads, -1, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv_heads, rep, v.shape[2], self.head_dim).reshape(B, self.n_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=native_gqa,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One routed expert, SwiGLU with Mixtral's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k mixture of experts (Mixtral layout) + optional shared expert + Switch/GShard balance loss.

    Routing: softmax over all experts, then top-k. For k>1 the k weights are renormalized to sum to 1
    (exactly Mixtral, so export keeps logits). For k=1 the weight stays p (Switch Transformer): renormalizing
    a single weight makes it the constant 1.0 and the router gets no gradient from the LM loss (MiniMind).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_tok
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.ffn_dim) for _ in range(cfg.n_experts))
        self.shared_expert = FeedForward(cfg.dim, cfg.ffn_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)                                    # [N, C]
        probs = F.softmax(self.gate(x).float(), dim=-1)         # [N, E]
        top_w, top_idx = probs.topk(self.top_k, dim=-1)         # [N, k]
        if self.top_k > 1:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        # group the N*k (token, expert) assignments by expert: one gather + matmuls + scatter-add per expert
        flat_expert = top_idx.flatten()
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        weight_of = top_w.flatten()[order]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        out = torch.zeros_like(x)
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n:
                tokens = token_of[start:start + n]
                y = self.experts[j](x.index_select(0, tokens)) * weight_of[start:start + n, None]
                out.index_add_(0, tokens, y.to(out.dtype))
                start += n
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        # Switch (Fedus et al. 2021, eq. 4) / GShard: E * sum_j f_j * P_j, f_j = share of assignments to j
        # (not differentiable), P_j = mean router probability of j; equals 1 when perfectly balanced.
        frac = counts.to(probs.dtype) / flat_expert.numel()
        aux = self.n_experts * (frac * probs.mean(0)).sum()
        return out.view(B, T, C), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:
            self.block_sparse_moe = MoE(cfg)
        else:
            self.mlp = FeedForward(cfg.dim, cfg.ffn_dim)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start_pos))
        h = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):
            return x + self.resid_dropout(self.mlp(h)), None
        y, aux = self.block_sparse_moe(h)
        return x + self.resid_dropout(y), aux


def decode_linear(x, weight):
    """x [B, in] @ weight.T for a decode step on a CPU: F.linear's product, by whichever kernel is fastest there
    (1 thread): torch.mv at B = 1; above, bf16 with the weight on the left (weight @ x.T; F.linear is ~2x slower
    in bf16: oneDNN packs the transposed weight every call), fp32 F.linear (MKL's sgemm is fastest on the small
    projections). -> [B, out] (a transposed view for bf16 B > 1)."""
    if x.shape[0] == 1:
        return torch.mv(weight, x[0])[None]
    if weight.dtype == torch.float32:
        return F.linear(x, weight)
    return (weight @ x.t()).t()


def packed_linear(x, weight):
    """F.linear(x, w) with w packed once by torch.ops.mkldnn._reorder_linear_weight (oneDNN's blocked layout, what
    torch.compile's CPU freezing uses): bf16 results equal F.linear's bit for bit, 5-25% faster than decode_linear
    at batch 1-8 (1 thread). x [B, in] contiguous -> [B, out]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def can_pack(weight) -> bool:
    """Whether decode packs this weight for packed_linear: bf16 on a CPU whose oneDNN does bf16."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def decode_norm(norm: RMSNorm, x):
    """RMSNorm.forward in 4 operations instead of 8 (torch.rms_norm over the fp32 upcast gives the same bits)."""
    return norm.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, norm.eps).to(x.dtype)


def decode_layer(block: "Block", weights: tuple, linear, x, cos, sin, cache: SlotCache, layer: int, rows: Rows):
    """One dense Block on one new token per row: x [B, C] -> [B, C], the same operations as Block.forward over
    [B, 1, C] (RMSNorm, rotary, GQA attention over slot b's keys 0..positions[b], SwiGLU) without the T axis, the
    dropout modules or F.linear: `weights` = (q/k/v stacked, o, gate/up stacked, down) from
    Transformer._decode_weights, each applied by `linear` (packed_linear or decode_linear); rotary on q and k at
    once; bf16 attention computed in fp32 (as llama.cpp does). cos [B, 1, D] and sin [B, 1, D]
    with its first half negated, in x's dtype, so x * cos + roll(x) * sin is apply_rope's x * cos + rotate_half(x)
    * sin to the bit."""
    w_qkv, w_o, w_gate_up, w_down = weights
    attn = block.self_attn
    B, H, Hkv, D = x.shape[0], attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = linear(decode_norm(block.input_layernorm, x), w_qkv)
    qk = qkv[:, :(H + Hkv) * D].reshape(B, H + Hkv, D)
    qk = qk * cos + qk.roll(D // 2, -1) * sin
    v = qkv[:, (H + Hkv) * D:].reshape(B, Hkv, 1, D)
    keys, values = cache.update_rows(layer, qk[:, H:, None], v, rows)
    mask = rows.mask if B > 1 else None   # one row sees all `length` keys: its mask is all True
    q = qk[:, :H, None]
    if q.dtype == torch.float32:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
    else:   # CPU SDPA in bf16 is 2-5x slower than in fp32 at one query (more so the longer the context), upcast
        y = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                           enable_gqa=H != Hkv).to(x.dtype)
    x = x + linear(y.reshape(B, H * D), w_o)
    gate_up = linear(decode_norm(block.post_attention_layernorm, x), w_gate_up)
    F_ = gate_up.shape[1] // 2
    return x + linear(F.silu(gate_up[:, :F_]) * gate_up[:, F_:], w_down)


class TokenDecoder:
    """bf16_gemv.Decoder over slot 0 of a SlotCache, bound again when the cache grows (SlotCache.reserve replaces
    its layers and raises its capacity). decoder(token, position) -> (logits fp32 [V], their argmax)."""
    __slots__ = ("step", "embedding", "tables", "cache", "capacity", "decoder")

    def __init__(self, step, embedding: torch.Tensor, tables: tuple, cache: SlotCache):
        self.step, self.embedding, self.tables = step, embedding, tables
        self.cache = weakref.ref(cache)   # the cache keeps its decoder (SlotCache.decoder), not the other way round
        self.capacity, self.decoder = -1, None

    def __call__(self, token: int, position: int) -> tuple[torch.Tensor, int]:
        cache = self.cache()
        if cache.capacity != self.capacity:
            self.decoder = bf16_gemv.Decoder(self.step, self.embedding, *self.tables, cache.k, cache.v)
            self.capacity = cache.capacity
        return self.decoder(token, position)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_dropout = nn.Dropout(cfg.dropout)
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: projections that write into the residual stream get std 0.02/sqrt(2*n_layers), so the
        # residual's variance does not grow with depth (keeps the 24-layer "deep" preset stable).
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- training / scoring -------------------------------------------------------------------------------
    def _hidden(self, input_ids, cache=None, start_pos=0):
        B, T = input_ids.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        x = self.embed_dropout(self.model.embed_tokens(input_ids))
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        aux_losses = []
        for i, layer in enumerate(self.model.layers):
            x, aux = layer(x, cos, sin, cache, i, start_pos)
            if aux is not None:
                aux_losses.append(aux)
        aux_loss = (torch.stack(aux_losses).mean() * self.config.aux_loss_coef if aux_losses
                    else x.new_zeros((), dtype=torch.float32))
        return self.model.norm(x), aux_loss

    def hidden_states(self, input_ids) -> torch.Tensor:
        """Final-layer hidden states [B, T, C] (after the last norm). Scorers apply self.lm_head only at the
        positions they need: with a large vocabulary the full [B, T, V] logits dominate time and memory."""
        return self._hidden(input_ids)[0]

    def forward(self, input_ids, targets=None, loss_weights=None, select=None) -> ModelOutput:
        """input_ids/targets [B, T] (targets -100 = ignored), loss_weights [B, T] float (see lm_loss).
        Train on out.loss + out.aux_loss. `select` (bool [B, T], without targets): logits only at those
        positions, [n_selected, V] (GRPO scores a few completion tokens after a long prompt; through forward,
        so DDP's hooks still run)."""
        h, aux_loss = self._hidden(input_ids)
        if select is not None:
            return ModelOutput(self.lm_head(h[select]), None, aux_loss)
        logits = self.lm_head(h)
        loss = lm_loss(logits, targets, loss_weights) if targets is not None else None
        return ModelOutput(logits, loss, aux_loss)

    # ---- inference -----------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, batch_size, min(max_len or self.config.max_seq_len, self.config.max_seq_len))

    def forward_with_cache(self, input_ids, cache: KVCache, start_pos: int, last_only: bool = False):
        """Run input_ids [B, T] at positions start_pos.. against `cache` (which it extends); returns logits
        [B, T, V] ([B, 1, V] with last_only). All rows share positions (no padding): batch same-length prompts."""
        h, _ = self._hidden(input_ids, cache, start_pos)
        return self.lm_head(h[:, -1:] if last_only else h)

    def new_slot_cache(self, n_slots: int, dtype: torch.dtype | None = None) -> SlotCache:
        return SlotCache(self, n_slots, dtype)

    def decode_step(self, tokens, positions, cache: SlotCache, lean: bool = True):
        """One new token for each of B independent sequences at once: tokens [B] go to positions [B] of slots
        0..B-1 of `cache` (each slot holding its sequence up to there); -> logits [B, V]. One forward for all
        rows: on a CPU, 8 rows cost about 1.5x one row, so concurrent requests are served ~5x faster than one
        after another. Row b's result equals forward_with_cache on that sequence alone (up to float rounding).
        On a CPU, dense layers take a lean path (decode_layer: [B, C] activations, q/k/v and gate/up stacked into
        one matmul each, bf16 weights packed once for oneDNN, bf16 attention in fp32; the module path's operations
        otherwise: its logits to the bit in fp32 on this CPU, within bf16 noise in bf16); a dense bf16 model at
        batch 1 over an fp32 cache runs its whole step, embedding to logits, in one call of bf16_gemv's compiled
        code instead (TokenDecoder; the per-layer products with the norms folded in, rotary, the cache write and
        attention, SwiGLU and the residual adds in the kernel, activations in fp32 between products as llama.cpp
        keeps them); MoE layers, autocast (GRPO's bf16 rollouts), active dropout and
        other devices run the modules as training does, and so does lean=False (the reference: tests, bench)."""
        device = self.lm_head.weight.device
        lean = lean and self._can_decode_lean()
        if lean and len(positions) == 1 and cache.dtype == torch.float32:
            step, _, linear = self._decode_weights(1)
            if linear is bf16_gemv.linear:
                logits, _ = self._bound_decoder(step, cache)(int(tokens[0]), int(positions[0]))
                return logits.to(torch.bfloat16)[None]   # a copy: the decoder's buffer is overwritten next step
        positions = torch.as_tensor(positions, dtype=torch.long, device=device)
        length = int(positions.max()) + 1
        if length > cache.capacity:
            raise ValueError(f"KV cache overflow: position {length - 1} >= capacity {cache.capacity}")
        mask = (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
        rows = Rows(positions, mask, length, torch.arange(len(positions), device=positions.device))
        x = self.model.embed_tokens(torch.as_tensor(tokens, dtype=torch.long, device=positions.device))
        cos, sin = self.rope_cos[positions][:, None, :], self.rope_sin[positions][:, None, :]   # [B, 1, D]
        if lean:
            weights, head, linear = self._decode_weights(len(positions), gemv=False)   # batch 1's is above
            half = cos.shape[-1] // 2
            rope = cos.to(x.dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            if lean and weights[i] is not None:
                x = decode_layer(layer, weights[i], linear, x, *rope, cache, i, rows)
            else:
                x = layer(x[:, None], cos[:, None], sin[:, None], cache, i, rows)[0][:, 0]
        if lean:
            return linear(decode_norm(self.model.norm, x), head)
        return self.lm_head(self.model.norm(x))

    def _can_decode_lean(self) -> bool:
        """Whether decode_step's lean paths apply now: a CPU, no autocast (GRPO's bf16 rollouts), no active dropout
        (the modules apply it)."""
        return (self.lm_head.weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and not (self.training and self.config.dropout))

    def token_decoder(self, cache: SlotCache):
        """Batch-1 decode for a caller that owns the model while it decodes (the engine, between its requests'
        prefills): -> decoder(token, position) -> (logits fp32 [V] (bf16 values, decode_step's batch-1 logits;
        overwritten by the next call), their argmax), over slot 0 of `cache`, or None where decode_step's batch 1
        does not run bf16_gemv's compiled step. Without decode_step's per-step work: the check that the packed
        weights are current happens here only (~0.15 ms a step), so get a new decoder after the weights change
        (an optimizer step, load_state_dict, a cast); no tensors are made per step."""
        if not self._can_decode_lean() or cache.dtype != torch.float32:
            return None
        step, _, linear = self._decode_weights(1)
        return self._bound_decoder(step, cache) if linear is bf16_gemv.linear else None

    def _bound_decoder(self, step, cache: SlotCache) -> "TokenDecoder":
        """The TokenDecoder of (step, cache), kept on the cache (it goes with the cache, and the model holds no
        cache alive) until the packed weights change."""
        kept = cache.decoder
        if kept is None or kept.step is not step:
            tables = self.__dict__.get("_rope_fp32")
            if tables is None:   # rope_cos/rope_sin follow the model's dtype (bf16 here): the kernel turns in fp32
                cfg = self.config
                tables = self.__dict__["_rope_fp32"] = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            kept = cache.decoder = TokenDecoder(step, self.model.embed_tokens.weight.detach(), tables, cache)
        return kept

    def _decode_weights(self, batch: int, gemv: bool = True) -> tuple[list, object, object]:
        """-> (per layer (q/k/v stacked [(H + 2 Hkv) * D, C], o, gate/up stacked [2 * F, C], down), or None for an
        MoE layer; the lm_head weight; the linear that applies them) for decode_layer at `batch` rows. bf16
        weights: at batch 1 of a dense model (and `gemv`) packed for bf16_gemv where this CPU runs it (the fastest
        matrix-vector product here; the RMSNorm weights folded in; the layers as one bf16_gemv.Step, for
        TokenDecoder, and linear = bf16_gemv.linear), otherwise for oneDNN's
        packed_linear; each packing is a second copy of every projection and the lm_head (+1x the weight memory,
        +2x when both batch 1 and larger batches are decoded). fp32 weights use decode_linear (copies of q/k/v and
        gate/up only). Built on first use and rebuilt whenever a source weight (norms included) is replaced or
        changed in place (its data pointer or version counter moves: .to(), load_state_dict, an optimizer step),
        so GRPO's rollouts always decode the policy it trains. The check costs ~0.15 ms a step at batch 1 (the weight
        stream has evicted what it touches); the engine's batch 1 makes it once per request (token_decoder)."""
        # the modules' own dicts, not nn.Module.__getattr__: this runs every step
        sources, model = [], self._modules["model"]
        for layer in model._modules["layers"]._modules.values():
            m = layer._modules
            if "mlp" not in m:   # MoE
                sources.append(())
                continue
            attn, mlp = m["self_attn"]._modules, m["mlp"]._modules
            sources.append(tuple(module._parameters["weight"] for module in (
                attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"], mlp["gate_proj"], mlp["up_proj"],
                mlp["down_proj"], m["input_layernorm"], m["post_attention_layernorm"])))
        head = self._modules["lm_head"]._parameters["weight"]
        final_norm = model._modules["norm"]._parameters["weight"]
        embedding = model._modules["embed_tokens"]._parameters["weight"]   # batch 1 reads it in bf16_gemv
        key = [(w.data_ptr(), w._version) for ws in sources for w in ws]
        key += [(w.data_ptr(), w._version) for w in (head, final_norm, embedding)]
        cached = self.__dict__.get("_decode_cache")
        if cached is None or cached[0] != key:
            # the sources' storages are held too, so no new weight can be allocated at a cached address
            cached = (key, {}, [w.detach() for ws in sources for w in ws] + [w.detach() for w in (head, final_norm,
                                                                                                  embedding)],
                      can_pack(head))
            self.__dict__["_decode_cache"] = cached   # a plain attribute: not a parameter, not in the state dict
        if not cached[3]:
            kind = "plain"
        elif batch == 1 and gemv and all(sources) and bf16_gemv.available():   # MoE layers: decode_layer's modules
            kind = "gemv"
        else:
            kind = "onednn"
        if kind not in cached[1]:
            with torch.no_grad():
                cached[1][kind] = self._pack_decode_weights(kind, sources, head, final_norm)
        return cached[1][kind]

    def _pack_decode_weights(self, kind: str, sources: list, head, final_norm) -> tuple[list, object, object]:
        """_decode_weights' build of one kind: "gemv" (bf16_gemv.Packed), "onednn" or "plain" (decode_linear)."""
        if kind == "gemv":
            eps = self.config.norm_eps
            Packed = bf16_gemv.Packed
            cfg = self.config
            rope_rows = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
            weights = [(Packed(torch.cat(ws[:3]), ws[7], eps, rope_rows=rope_rows, head_dim=cfg.head_dim), Packed(ws[3]),
                        Packed(torch.cat(ws[4:6]), ws[8], eps, swiglu=True), Packed(ws[6])) if ws else None
                       for ws in sources]
            head = Packed(head, final_norm, eps, bf16_out=True)
            bf16_gemv.lay_out_in_order([w for ws in weights for w in ws] + [head])
            step = bf16_gemv.Step(weights, head, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, eps)
            return step, head, bf16_gemv.linear
        prep = (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1)) if kind == "onednn" else (lambda w: w)
        weights = [tuple(prep(w) for w in (torch.cat(ws[:3]), ws[3], torch.cat(ws[4:6]), ws[6])) if ws else None
                   for ws in sources]
        return weights, prep(head), packed_linear if kind == "onednn" else decode_linear

    def check_generation(self, prompt_ids: list[int], temperature: float, top_k: int, top_p: float,
                         repetition_penalty: float) -> None:
        """The errors generate() raises for a prompt or sampling settings it cannot serve."""
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt")
        if len(prompt_ids) >= self.config.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_seq_len "
                             f"{self.config.max_seq_len}; truncate it first")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, stop_ids=(),
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """Stream sampled token ids. prompt + generated never exceeds max_seq_len: generation stops cleanly
        there (no sliding window). A stop id ends generation and is not yielded. temperature 0 = greedy."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_generation(prompt_ids, temperature, top_k, top_p, repetition_penalty)
        device = self.lm_head.weight.device
        n_new = min(max_new_tokens, self.config.max_seq_len - len(prompt_ids))
        if n_new <= 0:
            return
        cache = self.new_cache(1, len(prompt_ids) + n_new - 1)   # the last new token is never fed back
        stop = set(int(s) for s in stop_ids)
        seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt_ids, device=device)] = True
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        pos = 0
        for step in range(n_new):
            logits = self.forward_with_cache(ids, cache, pos, last_only=True)[0, -1].float()
            pos += ids.shape[1]
            token = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
            if token in stop:
                return
            yield token
            seen[token] = True
            if step + 1 < n_new:
                ids = torch.tensor([[token]], dtype=torch.long, device=device)

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once). exclude_embeddings drops the token embedding and an untied
        lm_head (Kaplan et al.'s non-embedding N)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def active_params(self) -> int:
        """Parameters one token multiplies through: non-embedding, only top-k routed experts, plus lm_head."""
        cfg = self.config
        n = self.num_params(exclude_embeddings=True) + self.lm_head.weight.numel()
        if cfg.n_experts:
            per_expert = 3 * cfg.dim * cfg.ffn_dim
            n -= cfg.n_layers * (cfg.n_experts - cfg.n_experts_per_tok) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd): PaLM appendix B, as nanoGPT's estimate_mfu:
        6 * N_active + 12 * n_layers * n_heads * head_dim * seq_len (attention scores counted non-causal)."""
        cfg = self.config
        return 6.0 * self.active_params() + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len

    def save_pretrained(self, out_dir) -> None:
        """model.safetensors (a tied lm_head saved once, as embed_tokens) + config.json; atomic per file."""
        from safetensors.torch import save

        from fileio import atomic_write_bytes, atomic_write_text
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        atomic_write_bytes(out_dir / "model.safetensors", save(state, metadata={"format": "pt"}))
        atomic_write_text(out_dir / "config.json", json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu") -> "Transformer":
        from safetensors.torch import load_file   # safetensors only: loading never unpickles
        ckpt_dir = Path(ckpt_dir)
        config = ModelConfig.from_dict(json.loads((ckpt_dir / "config.json").read_text()))
        state = load_file(str(ckpt_dir / "model.safetensors"), device=str(device))
        if config.tie_embeddings:
            if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
                raise ValueError("config says tie_embeddings but lm_head.weight differs from embed_tokens")
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model = cls(config).to(device)
        model.load_state_dict(state, strict=True)
        return model


def sample_next(logits, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                seen: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from fp32 logits [V]. Repetition penalty as CTRL (Keskar et al. 2019): logits of tokens already
    seen are divided by the penalty if positive, multiplied if negative."""
    if repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0:   # numpy's argmax on a CPU: ~10x faster than torch's over a 65K vocabulary, same index
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            return int(logits.numpy().argmax())
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:   # nucleus (Holtzman et al. 2019): smallest set whose probability reaches top_p
        sorted_probs, sorted_idx = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p   # the top token is always kept
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, sorted_idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
