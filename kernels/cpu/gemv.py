"""bf16 matrix-vector product on CPU for one-row batches (C, built at first use by native.py).

A batch-1 decode step reads every weight once, so it runs at the speed weights stream from memory.
oneDNN's packed bf16 linear streams them at 10-27 GB/s on this repo's CI VM (a Xeon without AMX);
this kernel, reading the plain row-major weight four rows at a time with AVX-512-BF16 dot products
and a software prefetch two quads ahead, at 16-42 GB/s (1.5-1.7x, tests/bench/bench_gemv.py). Only
for one row: with more, each weight chunk feeds several dot products and oneDNN's blocked GEMM
wins. fp32 accumulation, the output rounded to nearest even as oneDNN rounds it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from batonserve.kernels.cpu.native import SPLIT_C, load

SOURCE = r"""
#include <stdint.h>
#include <string.h>
@SPLIT@
#if defined(__AVX512BF16__)
#include <immintrin.h>
#define QUADS_AHEAD 2  /* prefetch distance in quads of rows (measured best at 1-3) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline __m512i load32(const uint16_t* p, int64_t k, int64_t kt, __mmask32 tail) {
    return k < kt ? _mm512_loadu_si512((const void*)(p + k)) : _mm512_maskz_loadu_epi16(tail, p + k);
}
static inline void put(float s, int64_t n, const uint16_t* bias, uint16_t* yb, float* yf) {
    if (bias) s += bf16_to_f32(bias[n]);
    if (yf) yf[n] = s; else yb[n] = f32_to_bf16(s);
}

/* y[n] = x . w[n] (+ bias[n]) for rows [r0, r1): four rows per pass, one accumulator each. */
static void gemv_part(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K,
                      const uint16_t* bias, uint16_t* yb, float* yf, int64_t r0, int64_t r1) {
    const int64_t kt = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - kt)) - 1ull);
    int64_t n = r0;
    for (; n + 4 <= r1; n += 4) {
        const uint16_t* w0 = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 32) {
            if (n + 4 * QUADS_AHEAD < N)
                for (int r = 0; r < 4; r++)
                    _mm_prefetch((const char*)(w0 + (r + 4 * QUADS_AHEAD) * K + k), _MM_HINT_T0);
            const __m512bh xv = (__m512bh)load32(x, k, kt, tail);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)load32(w0, k, kt, tail), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)load32(w0 + K, k, kt, tail), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)load32(w0 + 2 * K, k, kt, tail), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)load32(w0 + 3 * K, k, kt, tail), xv);
        }
        put(_mm512_reduce_add_ps(a0), n, bias, yb, yf);
        put(_mm512_reduce_add_ps(a1), n + 1, bias, yb, yf);
        put(_mm512_reduce_add_ps(a2), n + 2, bias, yb, yf);
        put(_mm512_reduce_add_ps(a3), n + 3, bias, yb, yf);
    }
    for (; n < r1; n++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)load32(w + n * K, k, kt, tail),
                                 (__m512bh)load32(x, k, kt, tail));
        put(_mm512_reduce_add_ps(a), n, bias, yb, yf);
    }
}

int64_t gemv_available(void) { return 1; }

/* Split over the threads in whole quads of rows. */
void gemv_bf16(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K, const uint16_t* bias,
               uint16_t* yb, float* yf, int64_t nth) {
    const int64_t quads = (N + 3) / 4;
    SPLIT(0, quads, nth,
          gemv_part(x, w, N, K, bias, yb, yf, a * 4, b * 4 < N ? b * 4 : N));
}
#else
int64_t gemv_available(void) { return 0; }
void gemv_bf16(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K, const uint16_t* bias,
               uint16_t* yb, float* yf, int64_t nth) {}
#endif
""".replace("@SPLIT@", SPLIT_C)

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use the kernel where it applies (default) or always oneDNN (A/B checks)."""
    global _enabled
    _enabled = enabled


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load("gemv", SOURCE)
    if lib is None:
        return None
    lib.gemv_available.restype = ctypes.c_int64
    if not lib.gemv_available():  # built without AVX-512-BF16
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [p, p, i64, i64, p, p, p, i64]
    lib.gemv_bf16.restype = None
    return lib


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when `gemv` can take x [1, K] @ weight [N, K].T + bias: one bf16 row on a CPU whose
    C kernel was built with AVX-512-BF16, a contiguous bf16 weight, a bf16 bias or none."""
    return (
        _enabled
        and (bias is None or bias.dtype == torch.bfloat16)
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and _library() is not None
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool
) -> torch.Tensor:
    """x [1, K] @ weight.T (+ bias) -> [1, N], bf16 (float32 with fp32_out). Check `applies`."""
    lib = _library()
    assert lib is not None
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty(1, n, dtype=torch.float32 if fp32_out else torch.bfloat16)
    b = bias.contiguous() if bias is not None else None
    lib.gemv_bf16(
        x.data_ptr(),
        weight.data_ptr(),
        n,
        k,
        b.data_ptr() if b is not None else None,
        None if fp32_out else out.data_ptr(),
        out.data_ptr() if fp32_out else None,
        torch.get_num_threads(),
    )
    return out
