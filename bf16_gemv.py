"""A bf16 matrix-vector product for one-token decode steps on a CPU with AVX512-BF16 (model.py's lean decode at
batch 1).

Written by hand because no library here does this well: at batch 1 a decode step is a chain of matrix-vector
products that stream every weight from memory once, and oneDNN's bf16 kernel (torch's fastest) reaches ~60% of
one core's memory bandwidth on the 65K x 512 lm_head and spends ~15-30 us of set-up per call on the small
projections; this kernel reads a weight packed into one front-to-back stream (blocks of 8 rows) at ~1.5x
oneDNN's speed, with ~1 us per call. fp32 accumulation (vdpbf16ps), one rounding to bf16 at the end, as oneDNN.

The C source below is compiled once with the system C compiler into ~/.cache/medllm-zh (native.py, keyed by its
hash) and loaded through ctypes (which releases the GIL during the call). `available()` is False, and model.py keeps
oneDNN, where there is no compiler, no avx512_bf16, or no Linux /proc/cpuinfo to say so.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

import native

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline uint16_t to_bf16(float f) {   /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* One matrix-vector product y = W x' for a decode step, fp32 accumulation of bf16 products (vdpbf16ps).
   x: fp32 [n_in]; x' = bf16(x), or with norm_eps >= 0 bf16(x * rsqrt(mean(x^2) + norm_eps)) (RMSNorm; its weight
   is folded into W by pack()). W as pack() lays it out: blocks of 8 rows; within a block, for each 32-column
   chunk, the 8 rows' 32 values (512 bytes) one after another, zero-padded to whole blocks and chunks, so the
   weight streams front to back. mode 0: y fp32 [n_out] = Wx' (+ residual[o] if residual is not NULL); 1: y
   bf16 [n_out]; 2 (SwiGLU, rows interleaved gate, up): y fp32 [n_out / 2], y[j] = silu(row 2j) * row 2j+1;
   3 (rotary on the first rope_rows rows, heads of head_dim rows, each head's rows j and j + head_dim / 2
   interleaved): y fp32 [n_out] = Wx' with rows j, j + d/2 of each head turned by cos[j], sin[j] (HF's
   rotate_half convention: y_j = a cos - b sin, y_{j+d/2} = b cos + a sin), the rows after rope_rows as mode 0. */
void gemv_bf16(const uint16_t *w, const float *x, void *y, const float *residual, int64_t n_out, int64_t n_in,
               float norm_eps, int mode, const float *cos, const float *sin, int64_t rope_rows, int64_t head_dim) {
    const int64_t chunks = (n_in + 31) / 32;
    uint16_t xb[chunks * 32] __attribute__((aligned(64)));
    float scale = 1.0f;
    if (norm_eps >= 0) {
        float ss = 0;
        for (int64_t i = 0; i < n_in; i++) ss += x[i] * x[i];
        scale = 1.0f / sqrtf(ss / (float)n_in + norm_eps);
    }
    for (int64_t i = 0; i < chunks * 32; i++) xb[i] = i < n_in ? to_bf16(x[i] * scale) : 0;
    for (int64_t o = 0; o < n_out; o += 8) {
        const uint16_t *p = w + o * chunks * 32;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        __m512 a4 = _mm512_setzero_ps(), a5 = _mm512_setzero_ps(), a6 = _mm512_setzero_ps(), a7 = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++, p += 256) {
            __m512bh xv = (__m512bh)_mm512_load_si512(xb + c * 32);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(p), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(p + 32), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(p + 64), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(p + 96), xv);
            a4 = _mm512_dpbf16_ps(a4, (__m512bh)_mm512_loadu_si512(p + 128), xv);
            a5 = _mm512_dpbf16_ps(a5, (__m512bh)_mm512_loadu_si512(p + 160), xv);
            a6 = _mm512_dpbf16_ps(a6, (__m512bh)_mm512_loadu_si512(p + 192), xv);
            a7 = _mm512_dpbf16_ps(a7, (__m512bh)_mm512_loadu_si512(p + 224), xv);
        }
        float s[8] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                      _mm512_reduce_add_ps(a3), _mm512_reduce_add_ps(a4), _mm512_reduce_add_ps(a5),
                      _mm512_reduce_add_ps(a6), _mm512_reduce_add_ps(a7)};
        int64_t rows = n_out - o < 8 ? n_out - o : 8;
        if (mode == 3 && o < rope_rows) {   /* pairs start at even rows (head_dim and rope_rows are even) */
            float *out = (float *)y;
            for (int64_t r = 0; r < rows; r += 2) {
                if (o + r >= rope_rows) {
                    for (int64_t k = r; k < rows; k++) out[o + k] = s[k];
                    break;
                }
                int64_t head = (o + r) / head_dim, j = (o + r) % head_dim / 2, base = head * head_dim;
                out[base + j] = s[r] * cos[j] - s[r + 1] * sin[j];
                out[base + j + head_dim / 2] = s[r + 1] * cos[j + head_dim / 2] + s[r] * sin[j + head_dim / 2];
            }
        } else if (mode == 0 || mode == 3) {
            float *out = (float *)y + o;
            for (int64_t r = 0; r < rows; r++) out[r] = residual ? residual[o + r] + s[r] : s[r];
        } else if (mode == 1) {
            uint16_t *out = (uint16_t *)y + o;
            for (int64_t r = 0; r < rows; r++) out[r] = to_bf16(s[r]);
        } else {
            float *out = (float *)y + o / 2;
            for (int64_t r = 0; r + 1 < rows; r += 2) out[r / 2] = s[r] / (1.0f + expf(-s[r])) * s[r + 1];
        }
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* One query's attention for a decode step at batch 1, after writing its key and value at position pos of an fp32
   cache layer k_cache/v_cache [n_kv_heads, capacity, head_dim] (a SlotCache's slot 0): qkv fp32 [(H + 2 Hkv) D]
   (q heads, k heads, v heads, rotary already applied), y fp32 [H D]. Query head h reads kv head h / (H / Hkv)
   (GQA); softmax(q k / sqrt(D)) over positions 0..pos in fp32, its maximum subtracted. */
void attend_one(const float *qkv, float *k_cache, float *v_cache, float *y, int64_t n_heads, int64_t n_kv_heads,
                int64_t head_dim, int64_t capacity, int64_t pos) {
    const int64_t D = head_dim, rep = n_heads / n_kv_heads;
    const float *q = qkv, *k = qkv + n_heads * D, *v = k + n_kv_heads * D;
    for (int64_t h = 0; h < n_kv_heads; h++)
        for (int64_t i = 0; i < D; i++) {
            k_cache[(h * capacity + pos) * D + i] = k[h * D + i];
            v_cache[(h * capacity + pos) * D + i] = v[h * D + i];
        }
    const float scale = 1.0f / sqrtf((float)D);
    float p[pos + 1];
    for (int64_t h = 0; h < n_heads; h++) {
        const float *keys = k_cache + h / rep * capacity * D, *values = v_cache + h / rep * capacity * D;
        float top = -INFINITY, total = 0;
        for (int64_t t = 0; t <= pos; t++) {
            p[t] = dot(q + h * D, keys + t * D, D) * scale;
            top = p[t] > top ? p[t] : top;
        }
        for (int64_t t = 0; t <= pos; t++) total += (p[t] = expf(p[t] - top));
        float *out = y + h * D;
        for (int64_t i = 0; i < D; i++) out[i] = 0;
        for (int64_t t = 0; t <= pos; t++) {
            const float w = p[t] / total;
            for (int64_t i = 0; i < D; i++) out[i] += w * values[t * D + i];
        }
    }
}

/* A whole decode step of a dense model at batch 1, up to the final norm: x fp32 [dim] (the token's embedding in,
   the last layer's output out). Per layer l, weights[4 l ..] = packed q/k/v (input norm folded, rows for rotary),
   o, gate/up (post-attention norm folded, interleaved), down, and caches[2 l ..] = its fp32 key and value cache
   layers [n_kv_heads, capacity, head_dim] (slot 0): the products, attention and adds of model.decode_layer over
   one row, with no interpreter in between. */
void decode_one(const int64_t *weights, const int64_t *caches, int64_t n_layers, float *x, const float *cos,
                const float *sin, int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn,
                int64_t capacity, int64_t pos, float eps) {
    const int64_t D = head_dim, n_qkv = (n_heads + 2 * n_kv_heads) * D;
    float qkv[n_qkv], y[n_heads * D], h[ffn];
    for (int64_t l = 0; l < n_layers; l++) {
        const uint16_t *const *w = (const uint16_t *const *)(weights + 4 * l);
        gemv_bf16(w[0], x, qkv, NULL, n_qkv, dim, eps, 3, cos, sin, (n_heads + n_kv_heads) * D, D);
        attend_one(qkv, (float *)caches[2 * l], (float *)caches[2 * l + 1], y, n_heads, n_kv_heads, D, capacity, pos);
        gemv_bf16(w[1], y, x, x, dim, n_heads * D, -1.0f, 0, NULL, NULL, 0, 0);
        gemv_bf16(w[2], x, h, NULL, 2 * ffn, dim, eps, 2, NULL, NULL, 0, 0);
        gemv_bf16(w[3], h, x, x, dim, ffn, -1.0f, 0, NULL, NULL, 0, 0);
    }
}
"""
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
LIBS = ["-lm"]
_kernel = None   # the loaded gemv_bf16; False once loading failed
_attend = None   # attend_one from the same library
_step = None     # decode_one from the same library


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags


def _load():
    global _kernel, _attend, _step
    if _kernel is None:
        _kernel = False
        lib = native.load("bf16_gemv", SOURCE, FLAGS, LIBS) if cpu_has_avx512_bf16() else None
        if lib is not None:   # None: no compiler, or one without avx512bf16
            _attend = lib.attend_one
            _attend.restype = None
            _attend.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
            _step = lib.decode_one
            _step.restype = None
            _step.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7
                              + [ctypes.c_float])
            fn = lib.gemv_bf16
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
                           + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2)
            _kernel = fn
    return _kernel


def available() -> bool:
    """Whether this machine runs the kernel (it is built on the first call)."""
    return bool(_load())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 -> the kernel's layout: [ceil(out/8), ceil(in/32), 8, 32], zero-padded."""
    n_out, n_in = weight.shape
    rows, cols = -(-n_out // 8) * 8, -(-n_in // 32) * 32
    padded = weight.new_zeros(rows, cols)
    padded[:n_out, :n_in] = weight
    return padded.view(rows // 8, 8, cols // 32, 32).transpose(1, 2).contiguous()


class Packed:
    """A weight [out, in] packed for linear(), with what linear() applies around the product: `norm` (an RMSNorm's
    weight [in], folded into the columns: linear() normalizes x first), `swiglu` (weight = gate and up stacked
    [2F, in], interleaved row by row: linear() returns silu(gate x) * up x, [F]), `bf16_out` (the result in bf16,
    not fp32), `rope_rows`/`head_dim` (rotary embeddings on the first rope_rows output rows, heads of head_dim:
    linear() takes that position's cos and sin)."""
    __slots__ = ("data", "n_out", "n_in", "eps", "mode", "rope_rows", "head_dim")

    def __init__(self, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 swiglu: bool = False, bf16_out: bool = False, rope_rows: int = 0, head_dim: int = 0):
        weight = weight.detach()
        if norm is not None:   # W diag(g) x == W (g * x): the norm's scale rides on the weight
            weight = (weight.float() * norm.detach().float()).to(weight.dtype)
        if swiglu:
            half = weight.shape[0] // 2
            weight = torch.stack((weight[:half], weight[half:]), 1).reshape(weight.shape)
        if rope_rows:   # each head's rows j and j + head_dim / 2 side by side, so one 8-row block turns whole pairs
            heads = weight[:rope_rows].view(rope_rows // head_dim, 2, head_dim // 2, -1).transpose(1, 2)
            weight = torch.cat((heads.reshape(rope_rows, -1), weight[rope_rows:]))
        self.data, (self.n_out, self.n_in) = pack(weight), weight.shape
        self.eps = float(eps) if norm is not None else -1.0   # < 0: no norm
        self.mode = 2 if swiglu else 1 if bf16_out else 3 if rope_rows else 0
        self.rope_rows, self.head_dim = rope_rows, head_dim


def lay_out_in_order(weights: list[Packed]) -> None:
    """Move the packed weights into one buffer, in the order a decode step reads them: the hardware prefetcher's
    stream then runs on from one product into the next instead of restarting at each (~20% faster over the
    chain of a step when other work sits between the products)."""
    flat = torch.cat([w.data.flatten() for w in weights])
    start = 0
    for w in weights:
        n = w.data.numel()
        w.data = flat[start:start + n].view(w.data.shape)
        start += n


def linear(x: torch.Tensor, weight: Packed, residual: torch.Tensor | None = None, cos: torch.Tensor | None = None,
           sin: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, in] fp32 -> [1, out] (see Packed), plus `residual` [1, out] fp32 if given (plain products only);
    cos, sin: fp32 [head_dim] of this position (weights packed with rope_rows only)."""
    if x.dtype != torch.float32 or x.shape != (1, weight.n_in) or x.device.type != "cpu":
        raise ValueError(f"bf16_gemv.linear needs a CPU fp32 [1, {weight.n_in}] input, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    n = weight.n_out // 2 if weight.mode == 2 else weight.n_out
    y = torch.empty(1, n, dtype=torch.bfloat16 if weight.mode == 1 else torch.float32)
    if residual is not None:
        if weight.mode not in (0, 3) or residual.dtype != torch.float32 or residual.shape != (1, n):
            raise ValueError("bf16_gemv.linear adds an fp32 [1, out] residual to a plain fp32 product only")
        residual = residual.contiguous()
    if weight.mode == 3:
        if not all(t is not None and t.dtype == torch.float32 and t.shape == (weight.head_dim,) and t.is_contiguous()
                   for t in (cos, sin)):
            raise ValueError(f"bf16_gemv.linear with rotary needs contiguous fp32 cos and sin [{weight.head_dim}]")
        rope = cos.data_ptr(), sin.data_ptr()
    else:
        rope = None, None
    _kernel(weight.data.data_ptr(), x.data_ptr(), y.data_ptr(), None if residual is None else residual.data_ptr(),
            weight.n_out, weight.n_in, weight.eps, weight.mode, *rope, weight.rope_rows, weight.head_dim)
    return y


def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, position: int) -> torch.Tensor:
    """One query's attention at batch 1 (attend_one): writes the key and value of qkv [1, (H + 2 Hkv) D] fp32 at
    `position` of slot 0 of the cache layer k_cache/v_cache [n_slots, Hkv, capacity, D] fp32, attends over positions
    0..position -> [1, H D] fp32, the same as SDPA (enable_gqa) over those keys, up to fp32 rounding."""
    _, n_kv_heads, capacity, head_dim = k_cache.shape
    if not (qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and qkv.is_contiguous()
            and k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
            and qkv.shape == (1, (n_heads + 2 * n_kv_heads) * head_dim) and 0 <= position < capacity):
        raise ValueError("bf16_gemv.attend needs contiguous fp32 qkv [1, (H + 2 Hkv) D] and cache layers, "
                         "and a position inside the cache")
    y = torch.empty(1, n_heads * head_dim)
    _attend(qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), y.data_ptr(), n_heads, n_kv_heads, head_dim,
            capacity, position)
    return y


class Step:
    """The pointer table decode() walks: per layer the four packed weights (Packed): q/k/v (input norm folded,
    rotary rows), o, gate/up (post-attention norm folded, SwiGLU), down."""
    __slots__ = ("layers", "table", "dims", "eps", "caches")

    def __init__(self, layers: list[tuple[Packed, Packed, Packed, Packed]], n_heads: int, n_kv_heads: int,
                 head_dim: int, eps: float):
        self.layers = layers   # held: the table points into them
        self.table = torch.tensor([w.data.data_ptr() for ws in layers for w in ws], dtype=torch.int64)
        qkv, o, gate_up, down = layers[0]
        self.dims = (o.n_out, n_heads, n_kv_heads, head_dim, down.n_in)
        if qkv.n_out != (n_heads + 2 * n_kv_heads) * head_dim or qkv.mode != 3 or gate_up.mode != 2:
            raise ValueError("bf16_gemv.Step needs q/k/v packed with rotary rows and gate/up for SwiGLU")
        self.eps = eps
        self.caches = (None, None)   # (the cache layers' data pointers, their pointer table) last checked


def decode(step: Step, x: torch.Tensor, k_caches: list, v_caches: list, cos: torch.Tensor, sin: torch.Tensor,
           position: int) -> torch.Tensor:
    """Every layer of one batch-1 decode step in one call (decode_one): x [1, dim] fp32 (the embedding) -> the
    last layer's output [1, dim] fp32, each layer's key and value written at `position` of slot 0 of its fp32
    cache layer [n_slots, Hkv, capacity, D]."""
    dim, n_heads, n_kv_heads, head_dim, ffn = step.dims
    capacity = k_caches[0].shape[2]
    if not (x.dtype == torch.float32 and x.shape == (1, dim) and 0 <= position < capacity
            and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (head_dim,)):
        raise ValueError("bf16_gemv.decode needs fp32 x [1, dim], cos/sin [head_dim] and a position inside the cache")
    layers = [t for pair in zip(k_caches, v_caches) for t in pair]
    pointers = [t.data_ptr() for t in layers]
    if pointers + [capacity] != step.caches[0]:   # a new or grown cache: check its layers once, not every step
        if len(layers) != 2 * len(step.layers) or not all(
                c.dtype == torch.float32 and c.is_contiguous() and c.shape[1:] == (n_kv_heads, capacity, head_dim)
                for c in layers):
            raise ValueError("bf16_gemv.decode needs a contiguous fp32 cache layer [n_slots, Hkv, capacity, D] "
                             "for every layer")
        step.caches = (pointers + [capacity], torch.tensor(pointers, dtype=torch.int64))
    caches = step.caches[1]
    x = x.clone()
    cos, sin = cos.contiguous(), sin.contiguous()   # held by a name: a temporary would be freed before the call
    _step(step.table.data_ptr(), caches.data_ptr(), len(step.layers), x.data_ptr(), cos.data_ptr(),
          sin.data_ptr(), dim, n_heads, n_kv_heads, head_dim, ffn, capacity, position, step.eps)
    return x
