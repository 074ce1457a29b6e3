"""C source of the CPU paged attention kernel (built by kernels/cpu/native.py)."""

from batonserve.kernels.cpu.native import SPLIT_C

# One task = one (query row, KV head): its G query heads read the row's keys straight from the
# paged cache (no gathered copy), in three passes: scores, softmax, weighted sum of values.
# Accumulation is float32 whatever the storage dtype. Arrays are row-major and contiguous except
# q, whose row and head strides are given (q is a slice of the fused qkv projection).
# e^x for x <= 0 on 16 AVX-512 lanes: the polynomial of exp_nonpos; small_ops.py uses it too.
EXP16_NONPOS = r"""
static inline __m512 exp16_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(0.000218712622881867f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.001238241558894515f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009686185978353024f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055478911846876144f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24023109674453735f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693146824836731f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(fi), _mm512_set1_epi32(127));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
@SPLIT@
static inline void load_f32(const float* s, float* d, int64_t n) { memcpy(d, s, n * 4); }
static inline void store_f32(const float* s, float* d, int64_t n) { memcpy(d, s, n * 4); }
static inline void load_bf16(const uint16_t* s, float* d, int64_t n) {
    uint32_t* du = (uint32_t*)d;
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) du[i] = ((uint32_t)s[i]) << 16;
}
static inline void store_bf16(const float* s, uint16_t* d, int64_t n) {
    const uint32_t* su = (const uint32_t*)s;
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = su[i];
        d[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  /* round to nearest even */
    }
}
static inline void load_f16(const _Float16* s, float* d, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = (float)s[i];
}
static inline void store_f16(const float* s, _Float16* d, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) d[i] = (_Float16)s[i];
}

/* e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into an integer power
   (exponent bits) and 2^f, f in [0, 1), by a degree-6 polynomial (relative error ~1e-7). Plain
   arithmetic, so loops over it vectorise without -ffast-math (whose crtfastmath would set
   flush-to-zero for the whole process). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    int32_t i = (int32_t)t;
    i -= (t < (float)i);                    /* floor for t <= 0 */
    const float f = t - (float)i;
    float p = 0.000218712622881867f;
    p = p * f + 0.001238241558894515f;
    p = p * f + 0.009686185978353024f;
    p = p * f + 0.055478911846876144f;
    p = p * f + 0.24023109674453735f;
    p = p * f + 0.693146824836731f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)(i + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The exported kernel: tasks [task_begin, task_end) over `nth` threads (SPLIT), each thread
   running NAME##_part on its share. A task is one query row and `hs` of its KV heads (task t:
   row t / (Hkv / hs), heads from (t % (Hkv / hs)) * hs): all of them when there are rows enough
   to share out, so a task reads whole contiguous key rows. */
#define ENTRY(NAME, T)                                                                          \
void NAME(const T* q, int64_t q_row_stride, int64_t q_head_stride,                              \
          const T* k, const T* v, const int32_t* block_tables, int64_t bt_stride,               \
          const int64_t* row_seq, const int64_t* row_last, T* out, float* lse,                  \
          int64_t H, int64_t Hkv, int64_t d, int64_t bs, int64_t window, float scale,           \
          int64_t hs, int64_t task_begin, int64_t task_end, int64_t nth) {                      \
    SPLIT(task_begin, task_end, nth,                                                            \
          NAME##_part(q, q_row_stride, q_head_stride, k, v, block_tables, bt_stride, row_seq,   \
                      row_last, out, lse, H, Hkv, d, bs, window, scale, hs, a, b));             \
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                     \
static void NAME##_part(const T* q, int64_t q_row_stride, int64_t q_head_stride,                 \
          const T* k, const T* v, const int32_t* block_tables, int64_t bt_stride,               \
          const int64_t* row_seq, const int64_t* row_last, T* out, float* lse,                  \
          int64_t H, int64_t Hkv, int64_t d, int64_t bs, int64_t window, float scale,           \
          int64_t hs, int64_t task_begin, int64_t task_end) {                                   \
    const int64_t G = H / Hkv;                                                                  \
    float* qf = (float*)malloc(sizeof(float) * (G * d + 2 * d + G * d));                        \
    float* kf = qf + G * d;                                                                     \
    float* acc = kf + d;                                                                        \
    float* tmp = acc + G * d;                                                                   \
    float* scores = NULL;                                                                       \
    int64_t cap = 0;                                                                            \
    for (int64_t t = task_begin * hs; t < task_end * hs; t++) { /* (row, KV head) pairs */      \
        const int64_t r = t / Hkv, h = t % Hkv;                                                 \
        const int64_t hi = row_last[r];                                                         \
        int64_t lo = 0;                                                                         \
        if (window > 0 && hi - window + 1 > 0) lo = hi - window + 1;                            \
        const int64_t n = hi - lo + 1;                                                          \
        T* o = out + (r * H + h * G) * d;                                                       \
        if (n <= 0) {                                                                           \
            memset(tmp, 0, sizeof(float) * d);                                                  \
            for (int64_t g = 0; g < G; g++) {                                                   \
                STORE(tmp, o + g * d, d);                                                       \
                if (lse) lse[r * H + h * G + g] = -INFINITY;                                    \
            }                                                                                   \
            continue;                                                                           \
        }                                                                                       \
        if (n * G > cap) {                                                                      \
            free(scores);                                                                       \
            cap = n * G;                                                                        \
            scores = (float*)malloc(sizeof(float) * cap);                                       \
        }                                                                                       \
        for (int64_t g = 0; g < G; g++)                                                         \
            LOAD(q + r * q_row_stride + (h * G + g) * q_head_stride, qf + g * d, d);            \
        const int32_t* table = block_tables + row_seq[r] * bt_stride;                           \
        const int64_t key_stride = Hkv * d;                                                     \
        for (int64_t j = lo; j <= hi;) { /* block by block: one table lookup per block */       \
            const int64_t off = j % bs;                                                         \
            const int64_t cnt = (bs - off < hi - j + 1) ? bs - off : hi - j + 1;                \
            const T* kp = k + (((int64_t)table[j / bs] * bs + off) * Hkv + h) * d;              \
            for (int64_t c = 0; c < cnt; c++, kp += key_stride) {                               \
                LOAD(kp, kf, d);                                                                \
                for (int64_t g = 0; g < G; g++) {                                               \
                    const float* qg = qf + g * d;                                               \
                    float s = 0.f;                                                              \
                    _Pragma("omp simd reduction(+:s)")                                          \
                    for (int64_t i = 0; i < d; i++) s += qg[i] * kf[i];                         \
                    scores[g * n + (j - lo + c)] = s * scale;                                   \
                }                                                                               \
            }                                                                                   \
            j += cnt;                                                                           \
        }                                                                                       \
        float m[64], sum[64];                                                                   \
        for (int64_t g = 0; g < G; g++) {                                                       \
            float* sg = scores + g * n;                                                         \
            float mx = sg[0];                                                                   \
            _Pragma("omp simd reduction(max:mx)")                                               \
            for (int64_t j = 1; j < n; j++) mx = sg[j] > mx ? sg[j] : mx;                       \
            float tot = 0.f;                                                                    \
            _Pragma("omp simd reduction(+:tot)")                                                \
            for (int64_t j = 0; j < n; j++) { sg[j] = exp_nonpos(sg[j] - mx); tot += sg[j]; }   \
            m[g] = mx; sum[g] = tot;                                                            \
        }                                                                                       \
        memset(acc, 0, sizeof(float) * G * d);                                                  \
        for (int64_t j = lo; j <= hi;) {                                                        \
            const int64_t off = j % bs;                                                         \
            const int64_t cnt = (bs - off < hi - j + 1) ? bs - off : hi - j + 1;                \
            const T* vp = v + (((int64_t)table[j / bs] * bs + off) * Hkv + h) * d;              \
            for (int64_t c = 0; c < cnt; c++, vp += key_stride) {                               \
                LOAD(vp, kf, d);                                                                \
                for (int64_t g = 0; g < G; g++) {                                               \
                    const float p = scores[g * n + (j - lo + c)];                               \
                    float* ag = acc + g * d;                                                    \
                    _Pragma("omp simd")                                                         \
                    for (int64_t i = 0; i < d; i++) ag[i] += p * kf[i];                         \
                }                                                                               \
            }                                                                                   \
            j += cnt;                                                                           \
        }                                                                                       \
        for (int64_t g = 0; g < G; g++) {                                                       \
            const float inv = 1.f / sum[g];                                                     \
            for (int64_t i = 0; i < d; i++) tmp[i] = acc[g * d + i] * inv;                      \
            STORE(tmp, o + g * d, d);                                                           \
            if (lse) lse[r * H + h * G + g] = m[g] + logf(sum[g]);                              \
        }                                                                                       \
    }                                                                                           \
    free(scores);                                                                               \
    free(qf);                                                                                   \
}                                                                                               \
ENTRY(NAME, T)

DEFINE_KERNEL(paged_attention_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_attention_bf16, uint16_t, load_bf16, store_bf16)
DEFINE_KERNEL(paged_attention_f16, _Float16, load_f16, store_f16)

int64_t max_group_size(void) { return 64; }

/* ---- AVX-512 path: one pass with an online softmax over tiles of up to 16 keys ----------------
   Scores of a tile land in one vector, so the max, exp and sum are vector ops; each key's dot
   product is d/16 FMAs and one horizontal add. Needs head_dim % 16 == 0 (else the generic kernel
   above runs). Same float32 accumulation; only the summation order differs from the generic one. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define FAST_KERNELS 1
#define PF_AHEAD 16  /* keys; 16 against 32-128 and no prefetch: docs/benchmarks.md, sixth round */
static inline __m512 ld16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16_bf16(const uint16_t* p) {
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static inline __m512 ld16_f16(const _Float16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
static inline void st16_f32(__m512 v, float* p) { _mm512_storeu_ps(p, v); }
static inline void st16_bf16(__m512 v, uint16_t* p) {  /* round to nearest even */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
static inline void st16_f16(__m512 v, _Float16* p) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
@EXP16_NONPOS@

#define DEFINE_FAST_KERNEL(NAME, T, LD16, ST16)                                                  \
static void NAME##_part(const T* q, int64_t q_row_stride, int64_t q_head_stride,                 \
          const T* k, const T* v, const int32_t* block_tables, int64_t bt_stride,               \
          const int64_t* row_seq, const int64_t* row_last, T* out, float* lse,                  \
          int64_t H, int64_t Hkv, int64_t d, int64_t bs, int64_t window, float scale,           \
          int64_t hs, int64_t task_begin, int64_t task_end) {                                   \
    const int64_t G = H / Hkv, hq = hs * G, nv = d / 16, key_stride = Hkv * d;                  \
    float* qf = (float*)aligned_alloc(64, sizeof(float) * (2 * hq * d + G * 16 + 2 * hq + 64)); \
    float* acc = qf + hq * d;                                                                   \
    float* sc = acc + hq * d;   /* [G][16] probabilities of one tile and KV head */             \
    float* m = sc + G * 16;     /* running max and sum of each of the task's query heads */     \
    float* l = m + hq;                                                                          \
    const __m512 sv = _mm512_set1_ps(scale);                                                    \
    for (int64_t t = task_begin; t < task_end; t++) {                                           \
        const int64_t r = t / (Hkv / hs), h0 = (t % (Hkv / hs)) * hs;                           \
        const int64_t hi = row_last[r];                                                         \
        int64_t lo = 0;                                                                         \
        if (window > 0 && hi - window + 1 > 0) lo = hi - window + 1;                            \
        T* o = out + (r * H + h0 * G) * d;                                                      \
        for (int64_t g = 0; g < hq; g++) {                                                      \
            const T* qg = q + r * q_row_stride + (h0 * G + g) * q_head_stride;                  \
            for (int64_t i = 0; i < nv; i++)                                                    \
                _mm512_storeu_ps(qf + g * d + 16 * i, _mm512_mul_ps(LD16(qg + 16 * i), sv));     \
            m[g] = -INFINITY; l[g] = 0.f;                                                       \
        }                                                                                       \
        memset(acc, 0, sizeof(float) * hq * d);                                                 \
        const int32_t* table = block_tables + row_seq[r] * bt_stride;                           \
        for (int64_t j = lo; j <= hi;) {                                                        \
            const int64_t off = j % bs;                                                         \
            int64_t cnt = (bs - off < hi - j + 1) ? bs - off : hi - j + 1;                      \
            if (cnt > 16) cnt = 16;                                                             \
            const int64_t base = ((int64_t)table[j / bs] * bs + off) * key_stride + h0 * d;     \
            /* The keys PF_AHEAD on (usually another block) are fetched into L2 now, a KV head's \
               slice at a time below, so memory reads stay in flight while this tile is worked  \
               on (into L1, 256 lines a tile crowded out the lines in use: 1.5-2x slower). */   \
            const int64_t jp = j + PF_AHEAD;                                                    \
            const T* kpf = NULL;                                                                \
            const T* vpf = NULL;                                                                \
            int64_t npf = 0;                                                                    \
            if (jp <= hi) {                                                                     \
                const int64_t offp = jp % bs;                                                   \
                npf = bs - offp < 16 ? bs - offp : 16;                                          \
                if (npf > hi - jp + 1) npf = hi - jp + 1;                                       \
                const int64_t bp = ((int64_t)table[jp / bs] * bs + offp) * key_stride + h0 * d; \
                kpf = k + bp;                                                                   \
                vpf = v + bp;                                                                   \
            }                                                                                   \
            const __mmask16 live = (__mmask16)((1u << cnt) - 1u);                               \
            for (int64_t hh = 0; hh < hs; hh++) {                                               \
                for (int64_t c = 0; c < npf; c++)                                               \
                    for (int64_t b = 0; b < d * (int64_t)sizeof(T); b += 64) {                  \
                        _mm_prefetch((const char*)(kpf + c * key_stride + hh * d) + b, _MM_HINT_T1); \
                        _mm_prefetch((const char*)(vpf + c * key_stride + hh * d) + b, _MM_HINT_T1); \
                    }                                                                           \
                const T* kp = k + base + hh * d;                                                \
                const T* vp = v + base + hh * d;                                                \
                float* qh = qf + hh * G * d;                                                    \
                float* ah = acc + hh * G * d;                                                   \
                for (int64_t c = 0; c < cnt; c++) {                                             \
                    const T* kc = kp + c * key_stride;                                          \
                    for (int64_t g = 0; g < G; g++) {                                           \
                        const float* qg = qh + g * d;                                           \
                        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), LD16(kc));                \
                        for (int64_t i = 1; i < nv; i++)                                        \
                            a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * i), LD16(kc + 16 * i), a); \
                        sc[g * 16 + c] = _mm512_reduce_add_ps(a);                               \
                    }                                                                           \
                }                                                                               \
                for (int64_t g = 0; g < G; g++) {                                               \
                    float* mg = m + hh * G + g;                                                 \
                    float* lg = l + hh * G + g;                                                 \
                    __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, sc + g * 16); \
                    const float mx = _mm512_reduce_max_ps(s);                                   \
                    const float mn = mx > *mg ? mx : *mg;                                       \
                    __m512 p = _mm512_maskz_mov_ps(live, exp16_nonpos(                          \
                        _mm512_sub_ps(s, _mm512_set1_ps(mn))));                                 \
                    _mm512_storeu_ps(sc + g * 16, p);                                           \
                    if (mn > *mg) {  /* rescale what was summed under the old max */            \
                        const float alpha = *mg == -INFINITY ? 0.f : expf(*mg - mn);            \
                        const __m512 av = _mm512_set1_ps(alpha);                                \
                        for (int64_t i = 0; i < nv; i++) {                                      \
                            float* ap = ah + g * d + 16 * i;                                    \
                            _mm512_storeu_ps(ap, _mm512_mul_ps(_mm512_loadu_ps(ap), av));       \
                        }                                                                       \
                        *lg *= alpha;                                                           \
                        *mg = mn;                                                               \
                    }                                                                           \
                    *lg += _mm512_reduce_add_ps(p);                                             \
                }                                                                               \
                for (int64_t i = 0; i < nv; i++) { /* 16 dims at a time: acc stays in registers */ \
                    __m512 a0 = _mm512_loadu_ps(ah + 16 * i);                                   \
                    __m512 a1 = G > 1 ? _mm512_loadu_ps(ah + d + 16 * i) : a0;                  \
                    const T* vq = vp + 16 * i;                                                  \
                    if (G == 2) {                                                               \
                        for (int64_t c = 0; c < cnt; c++, vq += key_stride) {                   \
                            const __m512 x = LD16(vq);                                          \
                            a0 = _mm512_fmadd_ps(_mm512_set1_ps(sc[c]), x, a0);                 \
                            a1 = _mm512_fmadd_ps(_mm512_set1_ps(sc[16 + c]), x, a1);            \
                        }                                                                       \
                        _mm512_storeu_ps(ah + 16 * i, a0);                                      \
                        _mm512_storeu_ps(ah + d + 16 * i, a1);                                  \
                        continue;                                                               \
                    }                                                                           \
                    for (int64_t c = 0; c < cnt; c++, vq += key_stride) {                       \
                        const __m512 x = LD16(vq);                                              \
                        for (int64_t g = 0; g < G; g++) {                                       \
                            float* ap = ah + g * d + 16 * i;                                    \
                            _mm512_storeu_ps(ap, _mm512_fmadd_ps(_mm512_set1_ps(sc[g * 16 + c]), \
                                                                 x, _mm512_loadu_ps(ap)));      \
                        }                                                                       \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            j += cnt;                                                                           \
        }                                                                                       \
        for (int64_t g = 0; g < hq; g++) {                                                      \
            const int empty = !(l[g] > 0.f);                                                    \
            const __m512 inv = _mm512_set1_ps(empty ? 0.f : 1.f / l[g]);                        \
            for (int64_t i = 0; i < nv; i++)                                                    \
                ST16(_mm512_mul_ps(_mm512_loadu_ps(acc + g * d + 16 * i), inv), o + g * d + 16 * i); \
            if (lse) lse[r * H + h0 * G + g] = empty ? -INFINITY : m[g] + logf(l[g]);           \
        }                                                                                       \
    }                                                                                           \
    free(qf);                                                                                   \
}                                                                                               \
ENTRY(NAME, T)

DEFINE_FAST_KERNEL(paged_attention_fast_f32, float, ld16_f32, st16_f32)
DEFINE_FAST_KERNEL(paged_attention_fast_bf16, uint16_t, ld16_bf16, st16_bf16)
DEFINE_FAST_KERNEL(paged_attention_fast_f16, _Float16, ld16_f16, st16_f16)
#else
#define FAST_KERNELS 0
#endif
int64_t has_fast_kernels(void) { return FAST_KERNELS; }
""".replace("@EXP16_NONPOS@", EXP16_NONPOS).replace("@SPLIT@", SPLIT_C)
