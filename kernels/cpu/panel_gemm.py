"""bf16 weights in panels of 32 output columns: GEMMs for batches of 4+ rows on CPUs without AMX
(C, built at first use by native.py), in place of oneDNN's packing (EngineConfig.cpu_gemm).

Two layouts, two kernels, one driver: 12 rows of x at a time against a panel, every row block
passing over it while it is in cache, the panels split over threads.

- fp32 panels ([N/32][K][16] int32, a k's 32 columns in one 64-byte line, column j paired with
  j + 16): each line is widened to float32 in registers (a shift and a mask) and multiplied with
  FMAs. For an Intel CPU without AMX, where AVX-512-BF16 dot products run at half the rate of
  fp32 FMAs (oneDNN bf16 ~97 GFLOP/s a core, these panels 127-163) and an fp32 copy of the
  weights would double the bytes a decode step streams.
- dot panels ([N/32][K/2][32] int32, the pair (k = 2i, 2i + 1) of one column): x stays bf16, a
  pair of its values is broadcast and one `vdpbf16ps` does two products per lane. For AMD Zen 4,
  where oneDNN's bf16 GEMM streams the weights of 4-16 rows slowly.

Products and sums are float32 in both (summation order differs from oneDNN's); outputs are
rounded to bf16 (nearest even) or kept float32 (logits).
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
#define MR 12  /* rows of x per block: 24 accumulators, 2 weight vectors, a broadcast */
#ifndef LINES_AHEAD
#define LINES_AHEAD 64  /* prefetch distance in panel lines (k steps), into the next panel too */
#endif
#ifndef MC_BYTES
#define MC_BYTES (768 * 1024)  /* rows of x per pass over the weight: within L2 */
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

/* Dot panels (CPUs whose bf16 dot products outrun fp32 FMAs: AMD Zen 4): [N/32][K2][32] int32,
   K2 = ceil(K / 2), each int32 the pair (k = 2i, k = 2i + 1) of one column (low half 2i); x stays
   bf16, a pair of its values broadcast per int32, and one vdpbf16ps does both products. */
#if defined(__AVX512BF16__)
#define DOT_KERNELS 1
#define DEFINE_DOT_BLOCK(R)                                                                     \
static void dot_block##R(const uint32_t* x, int64_t K2, const uint32_t* panel, const float* bias, \
                         int64_t n0, int64_t cols, int64_t N, uint16_t* yb, float* yf,          \
                         int64_t m0) {                                                          \
    __m512 lo[R], hi[R];                                                                        \
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm512_setzero_ps();                            \
    for (int64_t k = 0; k < K2; k++) {                                                          \
        _mm_prefetch((const char*)(panel + (k + LINES_AHEAD / 2) * 32), _MM_HINT_T0);           \
        _mm_prefetch((const char*)(panel + (k + LINES_AHEAD / 2) * 32 + 16), _MM_HINT_T0);      \
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(panel + k * 32));        \
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(panel + k * 32 + 16));   \
        for (int r = 0; r < R; r++) {                                                           \
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[r * K2 + k]);                \
            lo[r] = _mm512_dpbf16_ps(lo[r], w0, xv);                                            \
            hi[r] = _mm512_dpbf16_ps(hi[r], w1, xv);                                            \
        }                                                                                       \
    }                                                                                           \
    for (int r = 0; r < R; r++) store_row(lo[r], hi[r], bias, n0, cols, N, yb, yf, m0 + r);     \
}
DEFINE_DOT_BLOCK(1) DEFINE_DOT_BLOCK(2) DEFINE_DOT_BLOCK(3) DEFINE_DOT_BLOCK(4)
DEFINE_DOT_BLOCK(5) DEFINE_DOT_BLOCK(6) DEFINE_DOT_BLOCK(7) DEFINE_DOT_BLOCK(8)
DEFINE_DOT_BLOCK(9) DEFINE_DOT_BLOCK(10) DEFINE_DOT_BLOCK(11) DEFINE_DOT_BLOCK(12)
#else
#define DOT_KERNELS 0
#endif

/* The two GEMMs share one driver. XT: x's element type (float, or uint32 bf16 pairs); XK: x's
   row length in XT; LINE: a panel's int32s per step of XK (16, or 32 for a pair of k). */
#define DEFINE_GEMM(NAME, XT, BLOCK, LINE)                                                      \
typedef void (*NAME##_fn)(const XT*, int64_t, const uint32_t*, const float*, int64_t, int64_t,  \
                          int64_t, uint16_t*, float*, int64_t);                                 \
static const NAME##_fn NAME##_blocks[MR + 1] = {0, BLOCK##1, BLOCK##2, BLOCK##3, BLOCK##4,       \
    BLOCK##5, BLOCK##6, BLOCK##7, BLOCK##8, BLOCK##9, BLOCK##10, BLOCK##11, BLOCK##12};          \
/* Panels [p0, p1): each panel once from memory, every row block of x over it. */              \
static void NAME##_part(const XT* x, int64_t M, int64_t XK, const uint32_t* w, int64_t N,        \
                        const float* bias, uint16_t* yb, float* yf, int64_t p0, int64_t p1) {   \
    for (int64_t p = p0; p < p1; p++) {                                                         \
        const uint32_t* panel = w + p * XK * LINE;                                              \
        const int64_t n0 = p * 32, cols = N - n0 < 32 ? N - n0 : 32;                            \
        for (int64_t m = 0; m < M; m += MR) {                                                   \
            const int64_t r = M - m < MR ? M - m : MR;                                          \
            NAME##_blocks[r](x + m * XK, XK, panel, bias, n0, cols, N, yb, yf, m);              \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
/* y [M, N] = x [M, XK] @ the paneled weight (+ bias, float32 [N]), MC rows of x at a time so   \
   they stay in L2 while the panels stream past (the weight is read ceil(M / MC) times). */     \
void NAME(const XT* x, int64_t M, int64_t XK, const uint32_t* w, int64_t N, const float* bias,  \
          uint16_t* yb, float* yf, int64_t nth) {                                               \
    const int64_t per = MC_BYTES / (XK * (int64_t)sizeof(XT)) / MR * MR;                        \
    const int64_t mc = per > MR ? per : MR;                                                     \
    for (int64_t m0 = 0; m0 < M; m0 += mc) {                                                    \
        const int64_t rows = M - m0 < mc ? M - m0 : mc;                                         \
        uint16_t* ybm = yb ? yb + m0 * N : 0;                                                   \
        float* yfm = yf ? yf + m0 * N : 0;                                                      \
        SPLIT(0, (N + 31) / 32, nth,                                                            \
              NAME##_part(x + m0 * XK, rows, XK, w, N, bias, ybm, yfm, a, b));                  \
    }                                                                                           \
}
DEFINE_GEMM(panel_gemm, float, block, 16)
#if DOT_KERNELS
DEFINE_GEMM(dot_panel_gemm, uint32_t, dot_block, 32)
#endif

int64_t panel_gemm_available(void) { return 1; }
int64_t dot_panel_gemm_available(void) { return DOT_KERNELS; }
#else
int64_t panel_gemm_available(void) { return 0; }
int64_t dot_panel_gemm_available(void) { return 0; }
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
    lib.dot_panel_gemm_available.restype = ctypes.c_int64
    if not lib.panel_gemm_available():
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in (
        ("panel_gemm", "dot_panel_gemm") if lib.dot_panel_gemm_available() else ("panel_gemm",)
    ):
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, p, p, i64]
        getattr(lib, name).restype = None
    return lib


def available(dot: bool = False) -> bool:
    """True when the kernel is built on this machine (a C compiler and AVX-512; with `dot`, the
    dot-product kernel: AVX-512-BF16)."""
    lib = _library()
    return lib is not None and (not dot or bool(lib.dot_panel_gemm_available()))


def to_panels(weight: torch.Tensor, dot: bool = False) -> torch.Tensor:
    """A bf16 weight [N, K] laid out for `panel_gemm`, zero columns padding the last panel:
    int32 [ceil(N/32), K, 16], each int32 the pair (column j, column j + 16) of one k (low half
    j); or with `dot`, int32 [ceil(N/32), ceil(K/2), 32], each the pair (k = 2i, 2i + 1) of one
    column (low half 2i)."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    k_pad = k + (k % 2 if dot else 0)
    w = torch.zeros(panels * PANEL, k_pad, dtype=torch.bfloat16)
    w[:n, :k] = weight
    bits = w.view(torch.int16).to(torch.int32) & 0xFFFF  # [panels * 32, K]
    if dot:
        bits = bits.view(panels, PANEL, k_pad // 2, 2).permute(0, 2, 1, 3)  # [p, K/2, 32, 2]
    else:
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
    (float32 with fp32_out). The panels' last dimension tells their layout (see to_panels)."""
    lib = _library()
    assert lib is not None
    m, k = x.shape
    if panels.shape[-1] == PANEL:  # dot panels: x stays bf16, read as int32 pairs of k
        xin = x.contiguous()
        if k % 2 or xin.storage_offset() % 2:  # int32 pairs: an even row, an aligned start
            xin = torch.nn.functional.pad(xin, (0, k % 2))
        xin, xk, fn = xin.view(torch.int32), (k + 1) // 2, lib.dot_panel_gemm
    else:
        xin, xk, fn = x.float().contiguous(), k, lib.panel_gemm
    out = torch.empty(m, n, dtype=torch.float32 if fp32_out else torch.bfloat16)
    b = bias.float().contiguous() if bias is not None else None
    if b is not None and n % PANEL:  # the last panel's store reads 32 bias values
        b = torch.cat([b, b.new_zeros(PANEL - n % PANEL)])
    fn(
        xin.data_ptr(),
        m,
        xk,
        panels.data_ptr(),
        n,
        b.data_ptr() if b is not None else None,
        None if fp32_out else out.data_ptr(),
        out.data_ptr() if fp32_out else None,
        torch.get_num_threads(),
    )
    return out
