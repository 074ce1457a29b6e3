"""Fused small ops on CPU in C: residual add + RMSNorm, RoPE, SiLU * up (built at first use).

Eager torch runs each of these as 3-6 ops, each a pass over memory plus ~5 us of dispatch; at
decode batch 1-32 that dispatch is most of their time, at prefill the extra passes. One C pass
each, with the torch references' rounding order kept (half precision: every torch op's result
rounded to the storage dtype at the same points), so results match them to the last bit except
where a float32 sum is taken in another order (RMSNorm's mean of squares) or exp differs in
its last bits (SiLU: a polynomial, relative error ~1e-7). Rows split over
torch's OpenMP threads for large inputs (native.SPLIT_C).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from batonserve.kernels.cpu.native import SPLIT_C, load
from batonserve.kernels.cpu.paged_attention_src import EXP16_NONPOS

_THREAD_ELEMS = 1 << 16  # split rows over threads from this many elements

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
@SPLIT@
static inline float bf2f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t r = nan ? (u | 0x400000u) : u + 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(r >> 16);
}
static inline float f_id(float v) { return v; }
static inline float f_round_id(float v) { return v; }
static inline float bf_round(float v) { return bf2f(f2bf(v)); }

/* RMSNorm of rows [r0, r1) of x [rows, n] (row stride ldx); with res: x + res first, the sum
   stored to sum_out (rounded to T). float32: x * rsqrt(mean(x^2) + eps) * w (F.rms_norm).
   Half: w * T(x_f32 * rsqrt(...)), each product rounded (the reference's two ops). */
#define RMS(NAME, T, LOAD, STORE, ROUND, HALF)                                                  \
static void NAME##_part(const T* x, int64_t ldx, const T* res, int64_t ldr, const T* w, T* out, \
                        T* sum_out, int64_t n, float eps, int64_t r0, int64_t r1) {            \
    float buf[n];                                                                              \
    for (int64_t r = r0; r < r1; r++) {                                                        \
        const T* xr = x + r * ldx;                                                             \
        float ss = 0.0f;                                                                       \
        if (res) {                                                                             \
            const T* rr = res + r * ldr;                                                       \
            T* so = sum_out + r * n;                                                           \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < n; i++) { buf[i] = ROUND(LOAD(xr[i]) + LOAD(rr[i])); so[i] = STORE(buf[i]); } \
        } else {                                                                               \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < n; i++) buf[i] = LOAD(xr[i]);                              \
        }                                                                                      \
        _Pragma("omp simd reduction(+:ss)")                                                    \
        for (int64_t i = 0; i < n; i++) ss += buf[i] * buf[i];                                 \
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);                                   \
        T* o = out + r * n;                                                                    \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < n; i++)                                                        \
            o[i] = HALF ? STORE(ROUND(buf[i] * inv) * LOAD(w[i])) : STORE(buf[i] * inv * LOAD(w[i])); \
    }                                                                                          \
}                                                                                              \
void NAME(const T* x, int64_t ldx, const T* res, int64_t ldr, const T* w, T* out, T* sum_out,  \
          int64_t n, float eps, int64_t r0, int64_t r1, int64_t nth) {                         \
    SPLIT(r0, r1, nth, NAME##_part(x, ldx, res, ldr, w, out, sum_out, n, eps, a, b));          \
}

/* Rotate-half RoPE on rows [r0, r1) of x [T, heads, d] (strides ldt, ldh) into out [T, heads, d]
   with cos/sin [T, d] in T: x*c + rot(x)*s, rot = cat(-x2, x1), each product and the sum rounded. */
#define ROPE(NAME, T, LOAD, STORE, ROUND)                                                       \
static void NAME##_part(const T* x, int64_t ldt, int64_t ldh, const T* cs, const T* sn, T* out, \
                        int64_t heads, int64_t d, int64_t r0, int64_t r1) {                    \
    const int64_t h2 = d / 2;                                                                  \
    for (int64_t t = r0; t < r1; t++) {                                                        \
        const T* c = cs + t * d;                                                               \
        const T* s = sn + t * d;                                                               \
        for (int64_t h = 0; h < heads; h++) {                                                  \
            const T* xi = x + t * ldt + h * ldh;                                               \
            T* o = out + (t * heads + h) * d;                                                  \
            _Pragma("omp simd")                                                                \
            for (int64_t i = 0; i < h2; i++) {                                                 \
                const float a = LOAD(xi[i]), b = LOAD(xi[i + h2]);                             \
                o[i] = STORE(ROUND(a * LOAD(c[i])) + ROUND(-b * LOAD(s[i])));                  \
                o[i + h2] = STORE(ROUND(b * LOAD(c[i + h2])) + ROUND(a * LOAD(s[i + h2])));    \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
void NAME(const T* x, int64_t ldt, int64_t ldh, const T* cs, const T* sn, T* out,              \
          int64_t heads, int64_t d, int64_t r0, int64_t r1, int64_t nth) {                     \
    SPLIT(r0, r1, nth, NAME##_part(x, ldt, ldh, cs, sn, out, heads, d, a, b));                 \
}

/* silu(gate) * up over rows [r0, r1) of gu [rows, 2n] (gate | up, row stride ld) into out [rows, n]:
   T(silu(g)) * u as F.silu(g) * u rounds it. AVX-512 only (a vector exp); elsewhere torch runs. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
@EXP16_NONPOS@
static inline __m512 silu16(__m512 v) {  /* v * sigmoid(v), with e^-|v| so nothing overflows */
    const __m512 e = exp16_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 num = _mm512_mask_blend_ps(pos, e, _mm512_set1_ps(1.0f));
    return _mm512_mul_ps(v, _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}
static inline __m512i bf16_bits16(__m512 v) {  /* round to nearest even; NaN stays NaN */
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_srli_epi32(r, 16);
}
static inline __m512 bf16_round16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16));
}
static inline __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
static void silu_mul_f32_part(const float* gu, int64_t ld, float* out, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = tail16(n - i);
            const __m512 g = _mm512_maskz_loadu_ps(m, gu + r * ld + i);
            const __m512 u = _mm512_maskz_loadu_ps(m, gu + r * ld + n + i);
            _mm512_mask_storeu_ps(out + r * n + i, m, _mm512_mul_ps(silu16(g), u));
        }
}
static inline __m512 ld16_bf16(__mmask16 m, const uint16_t* p) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static void silu_mul_bf16_part(const uint16_t* gu, int64_t ld, uint16_t* out, int64_t n, int64_t r0,
                               int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = tail16(n - i);
            const __m512 g = ld16_bf16(m, gu + r * ld + i);
            const __m512 u = ld16_bf16(m, gu + r * ld + n + i);
            const __m512 y = _mm512_mul_ps(bf16_round16(silu16(g)), u);
            _mm256_mask_storeu_epi16(out + r * n + i, m, _mm512_cvtepi32_epi16(bf16_bits16(y)));
        }
}
void silu_mul_f32(const float* gu, int64_t ld, float* out, int64_t n, int64_t r0, int64_t r1,
                  int64_t nth) {
    SPLIT(r0, r1, nth, silu_mul_f32_part(gu, ld, out, n, a, b));
}
void silu_mul_bf16(const uint16_t* gu, int64_t ld, uint16_t* out, int64_t n, int64_t r0, int64_t r1,
                   int64_t nth) {
    SPLIT(r0, r1, nth, silu_mul_bf16_part(gu, ld, out, n, a, b));
}
int64_t has_silu_mul(void) { return 1; }
#else
int64_t has_silu_mul(void) { return 0; }
#endif

RMS(rms_f32, float, f_id, f_id, f_round_id, 0)
RMS(rms_bf16, uint16_t, bf2f, f2bf, bf_round, 1)
ROPE(rope_f32, float, f_id, f_id, f_round_id)
ROPE(rope_bf16, uint16_t, bf2f, f2bf, bf_round)
""".replace("@EXP16_NONPOS@", EXP16_NONPOS).replace("@SPLIT@", SPLIT_C)

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use the C kernels (default) or the torch references (A/B checks)."""
    global _enabled
    _enabled = enabled


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load("small_ops", SOURCE)
    if lib is None:
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for sfx in _SUFFIX.values():
        getattr(lib, f"rms_{sfx}").argtypes = [p, i64, p, i64, p, p, p, i64, f32, i64, i64, i64]
        getattr(lib, f"rope_{sfx}").argtypes = [p, i64, i64, p, p, p, i64, i64, i64, i64, i64]
        for name in ("rms", "rope"):
            getattr(lib, f"{name}_{sfx}").restype = None
    lib.has_silu_mul.restype = i64
    if lib.has_silu_mul():
        for sfx in _SUFFIX.values():
            getattr(lib, f"silu_mul_{sfx}").argtypes = [p, i64, p, i64, i64, i64, i64]
            getattr(lib, f"silu_mul_{sfx}").restype = None
    return lib


def usable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """True when the C kernels take these tensors: CPU, one dtype of float32/bfloat16, eager."""
    if not _enabled or x.dtype not in _SUFFIX or x.device.type != "cpu":
        return False
    for t in others:  # a plain loop: this runs ~20 times per decode step
        if t.dtype != x.dtype or t.device.type != "cpu":
            return False
    return not torch.compiler.is_compiling() and _library() is not None


def _over_rows(fn: Callable[..., None], head: tuple[Any, ...], rows: int, elems: int) -> None:
    """fn(*head, 0, rows, threads): rows split over torch's threads (in C) for large inputs."""
    fn(*head, 0, rows, torch.get_num_threads() if elems >= _THREAD_ELEMS else 1)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, n] (+ residual) -> (rms_norm(sum) * weight, sum or None); callers check `usable`."""
    lib = _library()
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    summed = res = None
    if residual is not None:
        res = residual.reshape(-1, n)
        if res.stride(1) != 1:
            res = res.contiguous()
        summed = torch.empty(rows, n, dtype=x.dtype)
    w = weight.contiguous()
    fn = getattr(lib, f"rms_{_SUFFIX[x.dtype]}")
    head: tuple[Any, ...] = (
        x2.data_ptr(),
        x2.stride(0),
        res.data_ptr() if res is not None else None,
    )
    head += (res.stride(0) if res is not None else 0, w.data_ptr(), out.data_ptr())
    head += (summed.data_ptr() if summed is not None else None, n, eps)
    _over_rows(fn, head, rows, rows * n)
    shape = x.shape
    return out.view(shape), summed.view(shape) if summed is not None else None


def has_silu_mul() -> bool:
    """True when `silu_mul` is built here (it needs AVX-512: a vector exp)."""
    lib = _library()
    return lib is not None and bool(lib.has_silu_mul())


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2n] (gate | up) -> silu(gate) * up [T, n]; check `usable` and `has_silu_mul`."""
    lib = _library()
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    rows, n = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(rows, n, dtype=gu.dtype)
    fn = getattr(lib, f"silu_mul_{_SUFFIX[gu.dtype]}")
    _over_rows(fn, (gu.data_ptr(), gu.stride(0), out.data_ptr(), n), rows, rows * n)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated by cos/sin [T, d] (x's dtype) -> new [T, heads, d]; check `usable`."""
    lib = _library()
    if x.stride(2) != 1:
        x = x.contiguous()
    t, heads, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(t, heads, d, dtype=x.dtype)
    fn = getattr(lib, f"rope_{_SUFFIX[x.dtype]}")
    head: tuple[Any, ...] = (x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr())
    head += (out.data_ptr(), heads, d)
    _over_rows(fn, head, t, t * heads * d)
    return out
