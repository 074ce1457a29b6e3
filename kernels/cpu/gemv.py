"""bf16 products of a few rows with a weight on CPU, for small decode batches (C, built at first
use by native.py).

A decode step of 1-8 sequences reads every weight once for little arithmetic, so it runs at the
speed weights stream from memory. oneDNN's packed bf16 linear streams them at 10-27 GB/s on this
repo's CI VM (a Xeon without AMX); this kernel reads the plain row-major weight once, a few rows
at a time with AVX-512-BF16 dot products for every row of x and a software prefetch ahead, at
1.3-2.0x that (tests/bench/bench_gemv.py). Above 8 rows each weight chunk feeds enough products
for a blocked GEMM (oneDNN's, or kernels/cpu/panel_gemm.py). fp32 accumulation; the output
rounded to nearest even, as oneDNN rounds it.
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
#define QUADS_AHEAD 2  /* one row: prefetch distance in quads of weight rows (best at 1-3) */
#define PAIRS_AHEAD 4  /* 2-8 rows: in pairs of weight rows */

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
/* y[m][n] = the sum of acc's lanes (+ bias[n]), in float32 or rounded to bf16 */
static inline void put(__m512 acc, int64_t m, int64_t n, int64_t N, const uint16_t* bias,
                       uint16_t* yb, float* yf) {
    float s = _mm512_reduce_add_ps(acc);
    if (bias) s += bf16_to_f32(bias[n]);
    if (yf) yf[m * N + n] = s; else yb[m * N + n] = f32_to_bf16(s);
}

/* One row of x: weight rows [r0, r1) four at a time, one accumulator each. */
static void rows1_part(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K,
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
            const __m512bh xv = load32(x, k, kt, tail);
            a0 = _mm512_dpbf16_ps(a0, load32(w0, k, kt, tail), xv);
            a1 = _mm512_dpbf16_ps(a1, load32(w0 + K, k, kt, tail), xv);
            a2 = _mm512_dpbf16_ps(a2, load32(w0 + 2 * K, k, kt, tail), xv);
            a3 = _mm512_dpbf16_ps(a3, load32(w0 + 3 * K, k, kt, tail), xv);
        }
        put(a0, 0, n, N, bias, yb, yf);
        put(a1, 0, n + 1, N, bias, yb, yf);
        put(a2, 0, n + 2, N, bias, yb, yf);
        put(a3, 0, n + 3, N, bias, yb, yf);
    }
    for (; n < r1; n++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32)
            a = _mm512_dpbf16_ps(a, load32(w + n * K, k, kt, tail), load32(x, k, kt, tail));
        put(a, 0, n, N, bias, yb, yf);
    }
}

/* M (2-8) rows of x: weight rows [r0, r1) two at a time, each chunk read once for all M rows
   (2M accumulators stay in registers). */
#define DEFINE_ROWS(M)                                                                          \
static void rows##M##_part(const uint16_t* x, const uint16_t* w, int64_t N, int64_t K,           \
                           const uint16_t* bias, uint16_t* yb, float* yf, int64_t r0,           \
                           int64_t r1) {                                                        \
    const int64_t kt = K & ~(int64_t)31;                                                        \
    const __mmask32 tail = (__mmask32)((1ull << (K - kt)) - 1ull);                              \
    for (int64_t n = r0; n < r1; n += 2) {                                                      \
        const int two = n + 1 < r1;                                                             \
        const uint16_t* w0 = w + n * K;                                                         \
        const uint16_t* w1 = two ? w0 + K : w0;  /* a last odd row pairs with itself */         \
        __m512 a0[M], a1[M];                                                                    \
        for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();                        \
        for (int64_t k = 0; k < K; k += 32) {                                                   \
            if (n + 2 * PAIRS_AHEAD + 1 < N) {                                                  \
                _mm_prefetch((const char*)(w0 + 2 * PAIRS_AHEAD * K + k), _MM_HINT_T0);         \
                _mm_prefetch((const char*)(w0 + (2 * PAIRS_AHEAD + 1) * K + k), _MM_HINT_T0);   \
            }                                                                                   \
            const __m512bh v0 = load32(w0, k, kt, tail), v1 = load32(w1, k, kt, tail);          \
            for (int m = 0; m < M; m++) {                                                       \
                const __m512bh xv = load32(x + m * K, k, kt, tail);                             \
                a0[m] = _mm512_dpbf16_ps(a0[m], v0, xv);                                        \
                a1[m] = _mm512_dpbf16_ps(a1[m], v1, xv);                                        \
            }                                                                                   \
        }                                                                                       \
        for (int m = 0; m < M; m++) {                                                           \
            put(a0[m], m, n, N, bias, yb, yf);                                                  \
            if (two) put(a1[m], m, n + 1, N, bias, yb, yf);                                     \
        }                                                                                       \
    }                                                                                           \
}
DEFINE_ROWS(2) DEFINE_ROWS(3) DEFINE_ROWS(4) DEFINE_ROWS(5)
DEFINE_ROWS(6) DEFINE_ROWS(7) DEFINE_ROWS(8)

typedef void (*part_fn)(const uint16_t*, const uint16_t*, int64_t, int64_t, const uint16_t*,
                        uint16_t*, float*, int64_t, int64_t);
static const part_fn PARTS[9] = {0, rows1_part, rows2_part, rows3_part, rows4_part,
                                 rows5_part, rows6_part, rows7_part, rows8_part};

int64_t gemv_max_rows(void) { return 8; }

/* y [M, N] = x [M, K] @ w [N, K]^T (+ bias): the threads split the weight rows in whole groups
   of four (one row of x) or two. */
void gemv_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K,
               const uint16_t* bias, uint16_t* yb, float* yf, int64_t nth) {
    const part_fn part = PARTS[M];
    const int64_t g = M == 1 ? 4 : 2, groups = (N + g - 1) / g;
    SPLIT(0, groups, nth, part(x, w, N, K, bias, yb, yf, a * g, b * g < N ? b * g : N));
}
#else
int64_t gemv_max_rows(void) { return 0; }
void gemv_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K,
               const uint16_t* bias, uint16_t* yb, float* yf, int64_t nth) {}
#endif
""".replace("@SPLIT@", SPLIT_C)

MAX_ROWS = 8  # more rows: each weight chunk feeds enough products for a blocked GEMM
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
    """True when `gemv` can take x [M, K] @ weight [N, K].T + bias: 1-8 bf16 rows on a CPU whose
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
    assert lib is not None
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
