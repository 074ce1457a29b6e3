"""C source of the CPU paged attention kernel (built by kernels/cpu/native.py)."""

# One task = one (query row, KV head): its G query heads read the row's keys straight from the
# paged cache (no gathered copy), in three passes: scores, softmax, weighted sum of values.
# Accumulation is float32 whatever the storage dtype. Arrays are row-major and contiguous except
# q, whose row and head strides are given (q is a slice of the fused qkv projection).
SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

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

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                     \
void NAME(const T* q, int64_t q_row_stride, int64_t q_head_stride,                              \
          const T* k, const T* v, const int32_t* block_tables, int64_t bt_stride,               \
          const int64_t* row_seq, const int64_t* row_last, T* out, float* lse,                  \
          int64_t H, int64_t Hkv, int64_t d, int64_t bs, int64_t window, float scale,           \
          int64_t task_begin, int64_t task_end) {                                               \
    const int64_t G = H / Hkv;                                                                  \
    float* qf = (float*)malloc(sizeof(float) * (G * d + 2 * d + G * d));                        \
    float* kf = qf + G * d;                                                                     \
    float* acc = kf + d;                                                                        \
    float* tmp = acc + G * d;                                                                   \
    float* scores = NULL;                                                                       \
    int64_t cap = 0;                                                                            \
    for (int64_t t = task_begin; t < task_end; t++) {                                           \
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
}

DEFINE_KERNEL(paged_attention_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_attention_bf16, uint16_t, load_bf16, store_bf16)
DEFINE_KERNEL(paged_attention_f16, _Float16, load_f16, store_f16)

int64_t max_group_size(void) { return 64; }
"""
