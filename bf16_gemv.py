"""A bf16 matrix-vector product for one-token decode steps on a CPU with AVX512-BF16 (model.py's lean decode at
batch 1).

Written by hand because no library here does this well: at batch 1 a decode step is a chain of matrix-vector
products that stream every weight from memory once, and oneDNN's bf16 kernel (torch's fastest) reaches ~60% of
one core's memory bandwidth on the 65K x 512 lm_head and spends ~15-30 us of set-up per call on the small
projections; this kernel reads a weight packed into one front-to-back stream (blocks of 8 rows) at ~1.5x
oneDNN's speed, with ~1 us per call. fp32 accumulation (vdpbf16ps), one rounding to bf16 at the end, as oneDNN.

The C source below is compiled once with the system C compiler into ~/.cache/medllm-zh (keyed by its hash) and
loaded through ctypes (which releases the GIL during the call). `available()` is False, and model.py keeps
oneDNN, where there is no compiler, no avx512_bf16, or no Linux /proc/cpuinfo to say so.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline uint16_t to_bf16(float f) {   /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* y[b, o] = sum_i w[o, i] * x[b, i] for b < batch, o < n_out; x [batch, n_in], y [batch, n_out], bf16. w as
   pack() lays it out: blocks of 8 rows; within a block, for each 32-column chunk, the 8 rows' 32 values (512
   bytes) one after another; zero-padded to whole blocks and chunks. */
void gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t n_out, int64_t n_in, int64_t batch) {
    const int64_t chunks = (n_in + 31) / 32;
    const __mmask32 tail = (n_in % 32) ? (__mmask32)((1u << (n_in % 32)) - 1) : (__mmask32)0xffffffff;
    for (int64_t o = 0; o < n_out; o += 8) {
        const uint16_t *block = w + o * chunks * 32;
        for (int64_t b = 0; b < batch; b++) {
            const uint16_t *xb = x + b * n_in, *p = block;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            __m512 a4 = _mm512_setzero_ps(), a5 = _mm512_setzero_ps(), a6 = _mm512_setzero_ps(), a7 = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++, p += 256) {
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(c == chunks - 1 ? tail : 0xffffffff, xb + c * 32);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(p), xv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(p + 32), xv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(p + 64), xv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(p + 96), xv);
                a4 = _mm512_dpbf16_ps(a4, (__m512bh)_mm512_loadu_si512(p + 128), xv);
                a5 = _mm512_dpbf16_ps(a5, (__m512bh)_mm512_loadu_si512(p + 160), xv);
                a6 = _mm512_dpbf16_ps(a6, (__m512bh)_mm512_loadu_si512(p + 192), xv);
                a7 = _mm512_dpbf16_ps(a7, (__m512bh)_mm512_loadu_si512(p + 224), xv);
            }
            float sums[8] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                             _mm512_reduce_add_ps(a3), _mm512_reduce_add_ps(a4), _mm512_reduce_add_ps(a5),
                             _mm512_reduce_add_ps(a6), _mm512_reduce_add_ps(a7)};
            int64_t rows = n_out - o < 8 ? n_out - o : 8;
            for (int64_t r = 0; r < rows; r++) y[b * n_out + o + r] = to_bf16(sums[r]);
        }
    }
}
"""
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-shared", "-fPIC"]
_kernel = None   # the loaded function; False once loading failed


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags


def _build() -> Path:
    """Compile SOURCE once per (source, flags, compiler); concurrent builders each write a temp file and rename."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medllm-zh"
    lib = cache / f"bf16_gemv-{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "bf16_gemv.c", Path(tmp) / "bf16_gemv.so"
        src.write_text(SOURCE)
        subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
        os.replace(out, lib)
    return lib


def _load():
    global _kernel
    if _kernel is None:
        _kernel = False
        if cpu_has_avx512_bf16():
            try:
                fn = ctypes.CDLL(str(_build())).gemv_bf16
            except (OSError, subprocess.SubprocessError):   # no compiler, or one without avx512bf16
                return False
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
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
    """A weight packed for linear(): the packed tensor and its logical shape."""
    __slots__ = ("data", "n_out", "n_in")

    def __init__(self, weight: torch.Tensor):
        self.data, (self.n_out, self.n_in) = pack(weight.detach()), weight.shape


def linear(x: torch.Tensor, weight: Packed) -> torch.Tensor:
    """x [B, in] bf16 @ weight.T -> [B, out] bf16 (F.linear's product, rounded once)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != weight.n_in or x.device.type != "cpu":
        raise ValueError(f"bf16_gemv.linear needs a CPU bf16 [B, {weight.n_in}] input, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.n_out, dtype=torch.bfloat16)
    _kernel(weight.data.data_ptr(), x.data_ptr(), y.data_ptr(), weight.n_out, weight.n_in, x.shape[0])
    return y
