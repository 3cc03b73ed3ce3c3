"""A bf16 matrix-vector product for one-token decode steps on a CPU with AVX512-BF16 (model.py's lean decode at
batch 1).

Written by hand because no library here does this well: at batch 1 a decode step is a chain of matrix-vector
products that stream every weight from memory once, and oneDNN's bf16 kernel (torch's fastest) reaches ~60% of
one core's memory bandwidth on the 65K x 512 lm_head and spends ~15-30 us of set-up per call on the small
projections; this kernel reads a row-major weight as 4 sequential streams at once (4 row groups) at ~1.5-2x
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
   is folded into W by pack()). W as pack() lays it out: row-major, n_in zero-padded to whole 32-column chunks,
   rows zero-padded to STREAMS groups of G = ceil(n_out / STREAMS) rows. Row i of every group is read at once:
   STREAMS sequential streams through memory keep more reads in flight than one (one core's prefetchers follow
   each; ~1.3x the bandwidth of one stream on the 65K x 512 lm_head). mode 0: y fp32 [n_out] = Wx' (+ residual[o]
   if residual is not NULL; residual may be y); 1: y bf16 [n_out]; 4: y fp32 [n_out], each rounded to bf16; 2 (SwiGLU, gate rows then up rows): y fp32
   [n_out / 2], y[j] = silu(row j) * row n_out / 2 + j; 3 (rotary on the first rope_rows rows, heads of head_dim
   rows): y fp32 [n_out] = Wx' with rows j, j + d/2 of each head turned by cos[j], sin[j] (HF's rotate_half
   convention: y_j = a cos - b sin, y_{j+d/2} = b cos + a sin), the rows after rope_rows as mode 0. */
#define STREAMS 4
void gemv_bf16(const uint16_t *w, const float *x, void *y, const float *residual, int64_t n_out, int64_t n_in,
               float norm_eps, int mode, const float *cos, const float *sin, int64_t rope_rows, int64_t head_dim) {
    const int64_t chunks = (n_in + 31) / 32, cols = chunks * 32, G = (n_out + STREAMS - 1) / STREAMS;
    uint16_t xb[cols] __attribute__((aligned(64)));
    float scale = 1.0f;
    if (norm_eps >= 0) {
        float ss = 0;
        for (int64_t i = 0; i < n_in; i++) ss += x[i] * x[i];
        scale = 1.0f / sqrtf(ss / (float)n_in + norm_eps);
    }
    for (int64_t i = 0; i < cols; i++) xb[i] = i < n_in ? to_bf16(x[i] * scale) : 0;
    /* SwiGLU and rotary combine two rows that sit in different streams: the products go to raw first */
    float raw[mode == 2 || mode == 3 ? n_out : 1];
    for (int64_t i = 0; i < G; i++) {
        const uint16_t *p = w + i * cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 32) {
            __m512bh xv = (__m512bh)_mm512_load_si512(xb + c);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(p + c), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(p + G * cols + c), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(p + 2 * G * cols + c), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(p + 3 * G * cols + c), xv);
        }
        float s[STREAMS] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                            _mm512_reduce_add_ps(a3)};
        for (int64_t k = 0; k < STREAMS; k++) {
            int64_t o = k * G + i;
            if (o >= n_out) break;
            if (mode == 2 || mode == 3) raw[o] = s[k];
            else if (mode == 1) ((uint16_t *)y)[o] = to_bf16(s[k]);
            else if (mode == 4) {
                uint32_t u = (uint32_t)to_bf16(s[k]) << 16;
                __builtin_memcpy((float *)y + o, &u, 4);
            }
            else ((float *)y)[o] = residual ? residual[o] + s[k] : s[k];
        }
    }
    if (mode == 2) {
        float *out = (float *)y;
        const int64_t F = n_out / 2;
        for (int64_t j = 0; j < F; j++) out[j] = raw[j] / (1.0f + expf(-raw[j])) * raw[F + j];
    } else if (mode == 3) {
        float *out = (float *)y;
        const int64_t half = head_dim / 2;
        for (int64_t base = 0; base < rope_rows; base += head_dim)
            for (int64_t j = 0; j < half; j++) {
                const float a = raw[base + j], b = raw[base + j + half];
                out[base + j] = a * cos[j] - b * sin[j];
                out[base + j + half] = b * cos[j + half] + a * sin[j + half];
            }
        for (int64_t o = rope_rows; o < n_out; o++) out[o] = residual ? residual[o] + raw[o] : raw[o];
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

/* The first index of the largest of n fp32 values, as numpy's argmax (the first NaN if there is one). */
static int64_t argmax(const float *v, int64_t n) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_loadu_ps(v + i);
        if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q)) break;   /* a NaN: the scalar scan below finds the first */
        top = _mm512_max_ps(top, a);
    }
    float best = _mm512_reduce_max_ps(top);
    for (int64_t j = i; j < n; j++) {
        if (v[j] != v[j]) return j;
        best = v[j] > best ? v[j] : best;
    }
    for (int64_t j = 0; j < n; j++)
        if (v[j] == best) return j;
    return 0;
}

/* A whole decode step of a dense model at batch 1: token -> logits fp32 [vocab] (each rounded to bf16, as the
   module path's bf16 lm_head gives them) and their argmax (the return value). plan (int64, filled by
   Decoder): [0] per layer l, weights[4 l ..] = packed q/k/v (input norm folded, rotary rows), o, gate/up
   (post-attention norm folded), down; [1] caches[2 l ..] = layer l's fp32 key and value cache layers [n_kv_heads,
   capacity, head_dim] (slot 0); [2] n_layers; [3] the embedding bf16 [vocab, dim]; [4] the packed lm_head (final
   norm folded); [5] vocab; [6], [7] the rotary cos and sin tables fp32 [positions, head_dim]; [8] dim; [9]
   n_heads; [10] n_kv_heads; [11] head_dim; [12] ffn; [13] capacity; [14] the norms' eps (float bits). The
   products, attention and adds of model.decode_layer over one row, with no interpreter in between. */
int64_t decode_token(const int64_t *plan, int64_t token, int64_t pos, float *logits) {
    const int64_t *weights = (const int64_t *)plan[0], *caches = (const int64_t *)plan[1];
    const int64_t n_layers = plan[2], vocab = plan[5], dim = plan[8], n_heads = plan[9], n_kv_heads = plan[10];
    const int64_t D = plan[11], ffn = plan[12], capacity = plan[13], n_qkv = (n_heads + 2 * n_kv_heads) * D;
    const uint32_t eps_bits = (uint32_t)plan[14];
    float eps;
    __builtin_memcpy(&eps, &eps_bits, 4);
    const float *cos = (const float *)plan[6] + pos * D, *sin = (const float *)plan[7] + pos * D;
    const uint16_t *e = (const uint16_t *)plan[3] + token * dim;
    float x[dim], qkv[n_qkv], y[n_heads * D], h[ffn];
    for (int64_t i = 0; i < dim; i++) {   /* bf16 -> fp32 is exact: the upper half of the float */
        uint32_t u = (uint32_t)e[i] << 16;
        __builtin_memcpy(x + i, &u, 4);
    }
    for (int64_t l = 0; l < n_layers; l++) {
        const uint16_t *const *w = (const uint16_t *const *)(weights + 4 * l);
        gemv_bf16(w[0], x, qkv, NULL, n_qkv, dim, eps, 3, cos, sin, (n_heads + n_kv_heads) * D, D);
        attend_one(qkv, (float *)caches[2 * l], (float *)caches[2 * l + 1], y, n_heads, n_kv_heads, D, capacity, pos);
        gemv_bf16(w[1], y, x, x, dim, n_heads * D, -1.0f, 0, NULL, NULL, 0, 0);
        gemv_bf16(w[2], x, h, NULL, 2 * ffn, dim, eps, 2, NULL, NULL, 0, 0);
        gemv_bf16(w[3], h, x, x, dim, ffn, -1.0f, 0, NULL, NULL, 0, 0);
    }
    gemv_bf16((const uint16_t *)plan[4], x, logits, NULL, vocab, dim, eps, 4, NULL, NULL, 0, 0);
    return argmax(logits, vocab);
}
"""
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
LIBS = ["-lm"]
_kernel = None   # the loaded gemv_bf16; False once loading failed
_attend = None   # attend_one from the same library
_step = None     # decode_token from the same library


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
            _step = lib.decode_token
            _step.restype = ctypes.c_int64
            _step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            fn = lib.gemv_bf16
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
                           + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2)
            _kernel = fn
    return _kernel


def available() -> bool:
    """Whether this machine runs the kernel (it is built on the first call)."""
    return bool(_load())


STREAMS = 4   # the C source's STREAMS: row groups read at once


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 -> the kernel's layout: row-major [STREAMS * ceil(out / STREAMS), ceil(in / 32) * 32],
    zero-padded."""
    n_out, n_in = weight.shape
    rows, cols = -(-n_out // STREAMS) * STREAMS, -(-n_in // 32) * 32
    padded = weight.new_zeros(rows, cols)
    padded[:n_out, :n_in] = weight
    return padded


class Packed:
    """A weight [out, in] packed for linear(), with what linear() applies around the product: `norm` (an RMSNorm's
    weight [in], folded into the columns: linear() normalizes x first), `swiglu` (weight = gate and up stacked
    [2F, in]: linear() returns silu(gate x) * up x, [F]), `bf16_out` (the result in bf16,
    not fp32), `rope_rows`/`head_dim` (rotary embeddings on the first rope_rows output rows, heads of head_dim:
    linear() takes that position's cos and sin)."""
    __slots__ = ("data", "n_out", "n_in", "eps", "mode", "rope_rows", "head_dim")

    def __init__(self, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 swiglu: bool = False, bf16_out: bool = False, rope_rows: int = 0, head_dim: int = 0):
        weight = weight.detach()
        if norm is not None:   # W diag(g) x == W (g * x): the norm's scale rides on the weight
            weight = (weight.float() * norm.detach().float()).to(weight.dtype)
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
    """The weights decode_token walks: per layer the four packed weights (Packed): q/k/v (input norm folded,
    rotary rows), o, gate/up (post-attention norm folded, SwiGLU), down; then the lm_head (final norm folded)."""
    __slots__ = ("layers", "head", "table", "dims", "eps")

    def __init__(self, layers: list[tuple[Packed, Packed, Packed, Packed]], head: Packed, n_heads: int,
                 n_kv_heads: int, head_dim: int, eps: float):
        self.layers, self.head = layers, head   # held: the table and Decoder's plan point into them
        self.table = torch.tensor([w.data.data_ptr() for ws in layers for w in ws], dtype=torch.int64)
        qkv, o, gate_up, down = layers[0]
        self.dims = (o.n_out, n_heads, n_kv_heads, head_dim, down.n_in)
        if qkv.n_out != (n_heads + 2 * n_kv_heads) * head_dim or qkv.mode != 3 or gate_up.mode != 2:
            raise ValueError("bf16_gemv.Step needs q/k/v packed with rotary rows and gate/up for SwiGLU")
        if head.n_in != o.n_out or head.eps != eps:
            raise ValueError("bf16_gemv.Step needs the lm_head packed with the final norm (the layers' eps) folded")
        self.eps = eps


class Decoder:
    """A batch-1 decode step of a dense model in one C call (decode_token): the token's embedding row, every layer
    (each writing its key and value at `position` of slot 0 of its fp32 cache layer), the lm_head and the argmax.
    Bound once to a Step, the model's bf16 embedding [vocab, dim], its fp32 rotary tables [positions, head_dim] and
    one cache's layers [n_slots, Hkv, capacity, D] fp32 (it holds every tensor its plan points at, so none is freed
    under it). decoder(token, position) -> (logits fp32 [vocab], each a bf16 value, overwritten by the next call;
    the index of the largest, first of ties, as numpy's argmax)."""
    __slots__ = ("step", "held", "plan", "logits", "vocab", "capacity", "_plan", "_logits")

    def __init__(self, step: Step, embedding: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_caches: list,
                 v_caches: list):
        dim, n_heads, n_kv_heads, head_dim, ffn = step.dims
        vocab, capacity = step.head.n_out, k_caches[0].shape[2]
        layers = [t for pair in zip(k_caches, v_caches) for t in pair]
        if len(layers) != 2 * len(step.layers) or not all(
                c.dtype == torch.float32 and c.is_contiguous() and c.shape[1:] == (n_kv_heads, capacity, head_dim)
                for c in layers):
            raise ValueError("bf16_gemv.Decoder needs a contiguous fp32 cache layer [n_slots, Hkv, capacity, D] "
                             "for every layer")
        if not (embedding.dtype == torch.bfloat16 and embedding.is_contiguous() and embedding.shape == (vocab, dim)
                and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape[1] == head_dim
                        and t.shape[0] >= capacity for t in (cos, sin))):
            raise ValueError("bf16_gemv.Decoder needs a contiguous bf16 embedding [vocab, dim] and fp32 rotary "
                             "tables [positions >= capacity, head_dim]")
        caches = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
        self.step, self.held = step, (embedding, cos, sin, layers, caches)
        eps_bits = int(torch.tensor([step.eps], dtype=torch.float32).view(torch.int32))
        self.plan = torch.tensor([step.table.data_ptr(), caches.data_ptr(), len(step.layers), embedding.data_ptr(),
                                  step.head.data.data_ptr(), vocab, cos.data_ptr(), sin.data_ptr(), dim, n_heads,
                                  n_kv_heads, head_dim, ffn, capacity, eps_bits & 0xFFFFFFFF], dtype=torch.int64)
        self.logits = torch.empty(vocab)
        self.vocab, self.capacity = vocab, capacity
        self._plan, self._logits = self.plan.data_ptr(), self.logits.data_ptr()

    def __call__(self, token: int, position: int) -> tuple[torch.Tensor, int]:
        if not 0 <= token < self.vocab:
            raise IndexError(f"token id {token} outside the vocabulary of {self.vocab}")
        if not 0 <= position < self.capacity:
            raise ValueError(f"KV cache overflow: position {position} >= capacity {self.capacity}")
        return self.logits, _step(self._plan, token, position, self._logits)
