"""bf16 products of a few rows with a weight on CPU, for small decode batches (C, built at first
use by native.py).

A decode step of 1-3 sequences reads every weight once for little arithmetic, so it runs at the
speed weights stream from memory. oneDNN's packed bf16 linear streams them at 10-16 GB/s on one
core of this repo's CI VMs; this kernel reads the plain row-major weight once, front to back, with
AVX-512-BF16 dot products for every row of x, at 1.5x that (tests/bench/bench_gemv.py). From 4 rows
the arithmetic, not the stream, sets the pace, and oneDNN's blocked GEMM (or
kernels/cpu/panel_gemm.py) is as fast or faster. fp32 accumulation; the output rounded to nearest
even, as oneDNN rounds it.
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
static inline __m512bh load32(const uint16_t* p, int64_t k, int64_t kt, __mmask32 tail) {
    return (__m512bh)(k < kt ? _mm512_loadu_si512((const void*)(p + k))
                             : _mm512_maskz_loadu_epi16(tail, p + k));
}
/* 16 accumulators -> one vector whose lane i is the sum of a[i]'s lanes: a tree of 15 adds
   (unpack, then 128-bit shuffles) instead of 16 horizontal reductions. */
static inline __m512 sum16(const __m512* a) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d p = _mm512_castps_pd(s[2 * i]), q = _mm512_castps_pd(s[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                         _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
}

/* M rows of x against weight rows [r0, r1), R = 16 / M of them at a time. Each weight row is
   read start to end before the next (a plain forward stream: interleaving rows ran at half the
   speed on a Zen 4), its chunks feeding all M rows of x; the M * R accumulators are summed by one
   sum16. */
#define DEFINE_ROWS(M)                                                                          \
static void rows##M##_part(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K,           \
                           const uint16_t* bias, uint16_t* yb, float* yf, int64_t r0,           \
                           int64_t r1) {                                                        \
    enum { R = 16 / M };                                                                        \
    const int64_t kt = K & ~(int64_t)31;                                                        \
    const __mmask32 tail = (__mmask32)((1ull << (K - kt)) - 1ull);                              \
    for (int64_t n0 = r0; n0 < r1; n0 += R) {                                                   \
        const int64_t nr = r1 - n0 < R ? r1 - n0 : R;                                           \
        __m512 a[16];                                                                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();       \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                  \
            if (r >= nr) break;                                                                 \
            const uint16_t* wr = w + (n0 + r) * K;                                              \
            for (int64_t k = 0; k < K; k += 32) {                                               \
                const __m512bh wv = load32(wr, k, kt, tail);                                    \
                _Pragma("GCC unroll 8") for (int m = 0; m < M; m++)                             \
                    a[m * R + r] = _mm512_dpbf16_ps(a[m * R + r], wv,                           \
                                                    load32(x + m * K, k, kt, tail));            \
            }                                                                                   \
        }                                                                                       \
        float o[16];                                                                            \
        _mm512_storeu_ps(o, sum16(a));                                                          \
        for (int m = 0; m < M; m++)                                                             \
            for (int64_t r = 0; r < nr; r++) {                                                  \
                const int64_t n = n0 + r;                                                       \
                const float s = o[m * R + r] + (bias ? bf16_to_f32(bias[n]) : 0.f);             \
                if (yf) yf[m * N + n] = s; else yb[m * N + n] = f32_to_bf16(s);                 \
            }                                                                                   \
    }                                                                                           \
}
DEFINE_ROWS(1) DEFINE_ROWS(2) DEFINE_ROWS(3)

typedef void (*part_fn)(const uint16_t*, const uint16_t*, int64_t, int64_t, const uint16_t*,
                        uint16_t*, float*, int64_t, int64_t);
static const part_fn PARTS[4] = {0, rows1_part, rows2_part, rows3_part};

int64_t gemv_max_rows(void) { return 3; }

/* y [M, N] = x [M, K] @ w [N, K]^T (+ bias): the threads split the weight rows in whole groups
   of 16 / M. */
void gemv_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K,
               const uint16_t* bias, uint16_t* yb, float* yf, int64_t nth) {
    const part_fn part = PARTS[M];
    const int64_t g = 16 / M, groups = (N + g - 1) / g;
    SPLIT(0, groups, nth, part(x, w, N, K, bias, yb, yf, a * g, b * g < N ? b * g : N));
}
#else
int64_t gemv_max_rows(void) { return 0; }
void gemv_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K,
               const uint16_t* bias, uint16_t* yb, float* yf, int64_t nth) {}
#endif
""".replace("@SPLIT@", SPLIT_C)

MAX_ROWS = 3  # more rows: the arithmetic sets the pace and a blocked GEMM does it better
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
    lib.gemv_max_rows.restype = ctypes.c_int64
    if lib.gemv_max_rows() != MAX_ROWS:  # built without AVX-512-BF16
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [p, i64, p, i64, i64, p, p, p, i64]
    lib.gemv_bf16.restype = None
    return lib


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when `gemv` can take x [M, K] @ weight [N, K].T + bias: 1-3 bf16 rows on a CPU whose
    C kernel was built with AVX-512-BF16, a contiguous bf16 weight, a bf16 bias or none."""
    return (
        _enabled
        and (bias is None or bias.dtype == torch.bfloat16)
        and x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
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
    """x [M, K] @ weight.T (+ bias) -> [M, N], bf16 (float32 with fp32_out). Check `applies`."""
    lib = _library()
    assert lib is not None and 1 <= x.shape[0] <= MAX_ROWS
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32 if fp32_out else torch.bfloat16)
    b = bias.contiguous() if bias is not None else None
    lib.gemv_bf16(
        x.data_ptr(),
        x.shape[0],
        weight.data_ptr(),
        n,
        k,
        b.data_ptr() if b is not None else None,
        None if fp32_out else out.data_ptr(),
        out.data_ptr() if fp32_out else None,
        torch.get_num_threads(),
    )
    return out
