"""bf16 weights, float32 arithmetic: a GEMM for batches of 16+ rows on CPUs without AMX (C, built
at first use by native.py).

On a Xeon without AMX, AVX-512-BF16 dot products run at half the rate of fp32 FMAs, so oneDNN's
bf16 GEMM reaches ~97 GFLOP/s per core against ~190 for fp32; but an fp32 copy of the weights
doubles the bytes a decode step streams from memory. This kernel keeps the weights in bf16, laid
out in panels of 32 output columns ([N/32][K][32]: one 64-byte line per k), widens each line to
float32 in registers (a shift and a mask: the line pairs column j with column j + 16) and
multiplies with FMAs, 12 rows of x at a time against a panel that stays in L1 while every row
block passes over it. Products and sums are float32, as in oneDNN's bf16 GEMM (summation order
differs); outputs are rounded to bf16 (nearest even) or kept float32 (logits).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from batonserve.kernels.cpu.native import SPLIT_C, load

PANEL = 32  # output columns per panel: one 64-byte line of bf16 per k

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
@SPLIT@
#if defined(__AVX512F__)
#include <immintrin.h>
#define MR 12  /* rows of x per block: 24 accumulators, 2 weight halves, a broadcast */
#ifndef LINES_AHEAD
#define LINES_AHEAD 64  /* prefetch distance in panel lines (k steps), into the next panel too */
#endif
#ifndef MC_BYTES
#define MC_BYTES (768 * 1024)  /* float32 rows of x per pass over the weight: within L2 */
#endif

static inline void store_row(__m512 lo, __m512 hi, const float* bias, int64_t n0, int64_t cols,
                             int64_t N, uint16_t* yb, float* yf, int64_t m) {
    if (bias) {
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias + n0));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + n0 + 16));
    }
    const __mmask16 mlo = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1u);
    const __mmask16 mhi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1u);
    if (yf) {
        _mm512_mask_storeu_ps(yf + m * N + n0, mlo, lo);
        _mm512_mask_storeu_ps(yf + m * N + n0 + 16, mhi, hi);
        return;
    }
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    __m512i u = _mm512_castps_si512(lo);  /* round to nearest even */
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), half));
    _mm256_mask_storeu_epi16(yb + m * N + n0, mlo, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    u = _mm512_castps_si512(hi);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), half));
    _mm256_mask_storeu_epi16(yb + m * N + n0 + 16, mhi, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

/* R rows of x (float32, [rows][K]) against one panel: y[m][n0 .. n0 + 32). */
#define DEFINE_BLOCK(R)                                                                         \
static void block##R(const float* x, int64_t K, const uint32_t* panel, const float* bias,       \
                     int64_t n0, int64_t cols, int64_t N, uint16_t* yb, float* yf, int64_t m0) { \
    __m512 lo[R], hi[R];                                                                        \
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();                            \
    const __m512i mask = _mm512_set1_epi32((int)0xFFFF0000u);                                   \
    for (int64_t k = 0; k < K; k++) {                                                           \
        _mm_prefetch((const char*)(panel + (k + LINES_AHEAD) * 16), _MM_HINT_T0);               \
        const __m512i line = _mm512_loadu_si512((const void*)(panel + k * 16));                 \
        const __m512 wlo = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));                    \
        const __m512 whi = _mm512_castsi512_ps(_mm512_and_si512(line, mask));                   \
        for (int r = 0; r < R; r++) {                                                           \
            const __m512 xv = _mm512_set1_ps(x[r * K + k]);                                     \
            lo[r] = _mm512_fmadd_ps(xv, wlo, lo[r]);                                            \
            hi[r] = _mm512_fmadd_ps(xv, whi, hi[r]);                                            \
        }                                                                                       \
    }                                                                                           \
    for (int r = 0; r < R; r++) store_row(lo[r], hi[r], bias, n0, cols, N, yb, yf, m0 + r);     \
}
DEFINE_BLOCK(1) DEFINE_BLOCK(2) DEFINE_BLOCK(3) DEFINE_BLOCK(4) DEFINE_BLOCK(5) DEFINE_BLOCK(6)
DEFINE_BLOCK(7) DEFINE_BLOCK(8) DEFINE_BLOCK(9) DEFINE_BLOCK(10) DEFINE_BLOCK(11) DEFINE_BLOCK(12)

typedef void (*block_fn)(const float*, int64_t, const uint32_t*, const float*, int64_t, int64_t,
                         int64_t, uint16_t*, float*, int64_t);
static const block_fn BLOCKS[MR + 1] = {0, block1, block2, block3, block4, block5, block6,
                                        block7, block8, block9, block10, block11, block12};

/* Panels [p0, p1): each panel once from memory, every row block of x over it. */
static void panels_part(const float* x, int64_t M, int64_t K, const uint32_t* w, int64_t N,
                        const float* bias, uint16_t* yb, float* yf, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const uint32_t* panel = w + p * K * 16;
        const int64_t n0 = p * 32, cols = N - n0 < 32 ? N - n0 : 32;
        for (int64_t m = 0; m < M; m += MR) {
            const int64_t r = M - m < MR ? M - m : MR;
            BLOCKS[r](x + m * K, K, panel, bias, n0, cols, N, yb, yf, m);
        }
    }
}

int64_t panel_gemm_available(void) { return 1; }

/* y [M, N] = x [M, K] (float32) @ the paneled weight (+ bias, float32 [N]), MC rows of x at a
   time so they stay in L2 while the panels stream past (the weight is read ceil(M / MC) times). */
void panel_gemm(const float* x, int64_t M, int64_t K, const uint32_t* w, int64_t N,
                const float* bias, uint16_t* yb, float* yf, int64_t nth) {
    const int64_t mc = MC_BYTES / (K * 4) / MR * MR > MR ? MC_BYTES / (K * 4) / MR * MR : MR;
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
        const int64_t rows = M - m0 < mc ? M - m0 : mc;
        uint16_t* ybm = yb ? yb + m0 * N : 0;
        float* yfm = yf ? yf + m0 * N : 0;
        SPLIT(0, (N + 31) / 32, nth,
              panels_part(x + m0 * K, rows, K, w, N, bias, ybm, yfm, a, b));
    }
}
#else
int64_t panel_gemm_available(void) { return 0; }
void panel_gemm(const float* x, int64_t M, int64_t K, const uint32_t* w, int64_t N,
                const float* bias, uint16_t* yb, float* yf, int64_t nth) {}
#endif
""".replace("@SPLIT@", SPLIT_C)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load("panel_gemm", SOURCE)
    if lib is None:
        return None
    lib.panel_gemm_available.restype = ctypes.c_int64
    if not lib.panel_gemm_available():
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.panel_gemm.argtypes = [p, i64, i64, p, i64, p, p, p, i64]
    lib.panel_gemm.restype = None
    return lib


def available() -> bool:
    """True when the kernel is built on this machine (a C compiler and AVX-512)."""
    return _library() is not None


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] laid out for `panel_gemm`: int32 [ceil(N/32), K, 16], each int32 the
    pair (column j, column j + 16) of one k (low half j), zero columns padding the last panel."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    w = torch.zeros(panels * PANEL, k, dtype=torch.bfloat16)
    w[:n] = weight
    bits = w.view(torch.int16).to(torch.int32) & 0xFFFF  # [panels * 32, K]
    bits = bits.view(panels, 2, 16, k).permute(0, 3, 2, 1)  # [panels, K, 16, (j, j + 16)]
    return (bits[..., 0] | (bits[..., 1] << 16)).contiguous()


def panel_gemm(
    x: torch.Tensor,
    panels: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    fp32_out: bool,
) -> torch.Tensor:
    """x [M, K] (bf16) @ the weight `panels` came from (.T, N = n columns) + bias -> [M, n], bf16
    (float32 with fp32_out)."""
    lib = _library()
    assert lib is not None
    xf = x.float().contiguous()
    m, k = xf.shape
    out = torch.empty(m, n, dtype=torch.float32 if fp32_out else torch.bfloat16)
    b = bias.float().contiguous() if bias is not None else None
    if b is not None and n % PANEL:  # the last panel's store reads 32 bias values
        b = torch.cat([b, b.new_zeros(PANEL - n % PANEL)])
    lib.panel_gemm(
        xf.data_ptr(),
        m,
        k,
        panels.data_ptr(),
        n,
        b.data_ptr() if b is not None else None,
        None if fp32_out else out.data_ptr(),
        out.data_ptr() if fp32_out else None,
        torch.get_num_threads(),
    )
    return out
