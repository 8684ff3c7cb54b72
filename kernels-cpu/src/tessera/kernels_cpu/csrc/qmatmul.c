// Matrix products with GGUF weights kept packed (Q4_0, Q4_1, Q8_0), for few tokens at a time.
// (fp32 inputs take an FMA path instead, see qmm_group_f32.)
//
// At load the blocks are repacked so that 16 consecutive output rows sit side by side: for a
// group of 16 rows and a block of 32 inputs, the quants of input k for the 16 rows are one
// 16-byte vector (Q4: one byte holds inputs i and i+16, as in GGUF), and the 16 rows' scales
// (and mins) are 16 fp16 values. A product unpacks each vector once into 16 lanes of bf16
// pairs and multiplies it with every token's input pair (vdpbf16ps), so each packed byte is
// read once per call whatever the number of tokens.
//
// Q4 quants q in 0..15 become the bf16 number 128 + q with one OR (0x4300 | q), so the block's
// dot product is d * (sum (128 + q) x) + (m - 128 d) * sum x, where m is the block's minimum
// (Q4_1) or -8 d (Q4_0). Inputs are rounded to bf16; the weights' own values are exact.

#include <stdint.h>
#include <string.h>

#define QT_Q4_0 2  // the GGUF type numbers
#define QT_Q4_1 3
#define QT_Q8_0 8
#ifndef QMT
#define QMT 16  // tokens per pass over a row group's packed bytes (at most 16)
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <stdlib.h>

#include "simd.h"

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7F800000u) == 0x7F800000u) return (uint16_t)((bits >> 16) | ((bits & 0xFFFF) ? 0x40 : 0));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// bytes per 32-input block of one row in GGUF, and in the repacked quants
static int gguf_block_bytes(int qtype) {
    return qtype == QT_Q4_0 ? 18 : qtype == QT_Q4_1 ? 20 : qtype == QT_Q8_0 ? 34 : -1;
}
static int packed_quant_bytes(int qtype) { return qtype == QT_Q8_0 ? 32 : 16; }

// Repack W [N, K] from GGUF blocks. qs: [N/16][K/32][bytes of a block][16 rows];
// d, m: [N/16][K/32][16] fp16 (m only for Q4_1). Returns 0, or -1 for shapes or types it
// does not take.
int tessera_q_repack(int qtype, const uint8_t *src, int N, int K, uint8_t *qs, uint16_t *d, uint16_t *m) {
    const int bb = gguf_block_bytes(qtype);
    if (bb < 0 || N % 16 || K % 32) return -1;
    const int nb = K / 32, qb = packed_quant_bytes(qtype);
    for (int n = 0; n < N; n++) {
        const int g = n / 16, r = n % 16;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = src + ((int64_t)n * nb + b) * bb;
            const int64_t gb = (int64_t)g * nb + b;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            d[gb * 16 + r] = dh;
            const uint8_t *q = blk + 2;
            if (qtype == QT_Q4_1) {
                memcpy(&m[gb * 16 + r], blk + 2, 2);
                q = blk + 4;
            }
            for (int i = 0; i < qb; i++) qs[(gb * qb + i) * 16 + r] = q[i];
        }
    }
    return 0;
}

// The inputs of every token as bf16 pairs (k, k + 16) of each block, and each block's sum.
typedef struct {
    const uint8_t *qs;
    const uint16_t *d, *m;
    const uint32_t *xp;  // [M][K/32][16]
    const float *xs;     // [M][K/32]
    const void *xf;      // fp32 inputs [M][K] (the fp32 path), else NULL
    void *out;
    int M, K, N, qtype, out_bf16;
} qmm_t;

// the 16 outputs of row group g for tokens [t0, t0 + MT)
static inline void store_rows(const qmm_t *a, int g, int t0, int MT, const __m512 *total) {
    for (int t = 0; t < MT; t++) {
        int64_t off = (int64_t)(t0 + t) * a->N + g * 16;
        if (a->out_bf16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + off), (__m256i)_mm512_cvtneps_pbh(total[t]));
        else
            _mm512_storeu_ps((float *)a->out + off, total[t]);
    }
}

static inline __m512i unpack_q4(const uint8_t *p) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0x0F));
    __m512i hi = _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16);
    // lo | hi | 0x43004300: bf16 128 + q in each half
    return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi32(0x43004300), 0xFE);
}

static inline __m512i unpack_q8(const uint8_t *p, __m512i interleave) {
    __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * 16))));
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// rows of group g for tokens [t0, t0 + MT)
static inline __attribute__((always_inline)) void qmm_group(const qmm_t *a, int g, int t0, const int MT) {
    const int nb = a->K / 32, qb = packed_quant_bytes(a->qtype);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 total[QMT];
    for (int t = 0; t < MT; t++) total[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int64_t gb = (int64_t)g * nb + b;
        const uint8_t *q = a->qs + gb * qb * 16;
        __m512 acc[QMT];
        for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) {
            __m512i w = a->qtype == QT_Q8_0 ? unpack_q8(q + i * 16, interleave) : unpack_q4(q + i * 16);
            for (int t = 0; t < MT; t++) {
                __m512i xv = _mm512_set1_epi32((int)a->xp[((int64_t)(t0 + t) * nb + b) * 16 + i]);
                acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w, (__m512bh)xv);
            }
        }
        __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->d + gb * 16)));
        if (a->qtype == QT_Q8_0) {
            for (int t = 0; t < MT; t++) total[t] = _mm512_fmadd_ps(dv, acc[t], total[t]);
        } else {
            __m512 mv = a->qtype == QT_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->m + gb * 16)))
                                            : _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f));
            __m512 mb = _mm512_fmadd_ps(dv, _mm512_set1_ps(-128.0f), mv);  // m - 128 d
            for (int t = 0; t < MT; t++) {
                total[t] = _mm512_fmadd_ps(dv, acc[t], total[t]);
                total[t] = _mm512_fmadd_ps(mb, _mm512_set1_ps(a->xs[(int64_t)(t0 + t) * nb + b]), total[t]);
            }
        }
    }
    store_rows(a, g, t0, MT, total);
}

// The same for fp32 inputs, in fp32: sum q x accumulated with FMAs (q converted exactly), so
// the result matches the dequantized weight times x up to summation order.
static inline __attribute__((always_inline)) void qmm_group_f32(const qmm_t *a, int g, int t0, const int MT) {
    const int nb = a->K / 32, qb = packed_quant_bytes(a->qtype);
    const float *x = (const float *)a->xf;
    __m512 total[QMT];
    for (int t = 0; t < MT; t++) total[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int64_t gb = (int64_t)g * nb + b;
        const uint8_t *q = a->qs + gb * qb * 16;
        __m512 acc[QMT];
        for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) {
            __m512 w0, w1;  // inputs i and i + 16 of the block, 16 rows
            if (a->qtype == QT_Q8_0) {
                w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i * 16))));
                w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + (i + 16) * 16))));
            } else {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * 16)));
                w0 = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)));
                w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
            }
            for (int t = 0; t < MT; t++) {
                const float *xt = x + (int64_t)(t0 + t) * a->K + b * 32;
                acc[t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xt[i]), acc[t]);
                acc[t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xt[i + 16]), acc[t]);
            }
        }
        __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->d + gb * 16)));
        if (a->qtype == QT_Q8_0) {
            for (int t = 0; t < MT; t++) total[t] = _mm512_fmadd_ps(dv, acc[t], total[t]);
        } else {
            __m512 mv = a->qtype == QT_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->m + gb * 16)))
                                            : _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f));
            for (int t = 0; t < MT; t++) {
                total[t] = _mm512_fmadd_ps(dv, acc[t], total[t]);
                total[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a->xs[(int64_t)(t0 + t) * nb + b]), total[t]);
            }
        }
    }
    store_rows(a, g, t0, MT, total);
}

#define QMM_CASE(fn, n) \
    case n: fn(a, g, t0, n); break;
// tokens in chunks of QMT, the rest in one call with a constant count
#define QMM_TOKENS(fn)                                                                              \
    do {                                                                                            \
        int t0 = 0;                                                                                 \
        for (; t0 + QMT <= a->M; t0 += QMT) fn(a, g, t0, QMT);                                      \
        switch (a->M - t0) {                                                                        \
            QMM_CASE(fn, 1) QMM_CASE(fn, 2) QMM_CASE(fn, 3) QMM_CASE(fn, 4) QMM_CASE(fn, 5)         \
            QMM_CASE(fn, 6) QMM_CASE(fn, 7) QMM_CASE(fn, 8) QMM_CASE(fn, 9) QMM_CASE(fn, 10)        \
            QMM_CASE(fn, 11) QMM_CASE(fn, 12) QMM_CASE(fn, 13) QMM_CASE(fn, 14) QMM_CASE(fn, 15)    \
        default: break;                                                                             \
        }                                                                                           \
    } while (0)

static void qmm_part(void *arg, int part, int n_parts) {
    const qmm_t *a = (const qmm_t *)arg;
    const int groups = a->N / 16;
    const int g0 = (int)((int64_t)groups * part / n_parts), g1 = (int)((int64_t)groups * (part + 1) / n_parts);
    for (int g = g0; g < g1; g++) {
        if (a->xf)
            QMM_TOKENS(qmm_group_f32);
        else
            QMM_TOKENS(qmm_group);
    }
}

// out [M, N] (fp32, or bf16 when out_bf16) = x [M, K] (bf16 when x_bf16, else fp32) times the
// repacked W [N, K] transposed. bf16 inputs multiply with vdpbf16ps, fp32 ones with FMAs.
int tessera_q_matmul(int qtype, const void *x, int x_bf16, int M, int K, int N, const uint8_t *qs,
                     const uint16_t *d, const uint16_t *m, void *out, int out_bf16, int n_threads) {
    if (gguf_block_bytes(qtype) < 0 || N % 16 || K % 32 || M <= 0) return -1;
    const int nb = K / 32;
    uint32_t *xp = malloc(sizeof(uint32_t) * (size_t)M * nb * 16);
    float *xs = malloc(sizeof(float) * (size_t)M * nb);
    if (!xp || !xs) {
        free(xp);
        free(xs);
        return -3;
    }
    for (int t = 0; t < M; t++) {
        for (int b = 0; b < nb; b++) {
            float s = 0.0f;
            if (!x_bf16) {  // fp32 path: exact sums, no pairs
                for (int i = 0; i < 32; i++) s += ((const float *)x)[(int64_t)t * K + b * 32 + i];
                xs[(int64_t)t * nb + b] = s;
                continue;
            }
            for (int i = 0; i < 16; i++) {
                const int64_t k0 = (int64_t)t * K + b * 32 + i, k1 = k0 + 16;
                uint16_t lo = ((const uint16_t *)x)[k0], hi = ((const uint16_t *)x)[k1];
                xp[((int64_t)t * nb + b) * 16 + i] = (uint32_t)lo | ((uint32_t)hi << 16);
                s += bf16_to_float(lo) + bf16_to_float(hi);
            }
            xs[(int64_t)t * nb + b] = s;
        }
    }
    qmm_t a = {qs, d, m, xp, xs, x_bf16 ? NULL : x, out, M, K, N, qtype, out_bf16};
    const int groups = N / 16;
    if ((int64_t)groups * 16 * M * K < (1 << 16)) n_threads = 1;  // too small to share
    if (n_threads > groups) n_threads = groups;
    pool_run(qmm_part, &a, n_threads < 1 ? 1 : n_threads, n_threads < 1 ? 1 : n_threads);
    free(xp);
    free(xs);
    return 0;
}

typedef struct {
    const uint8_t *qs;
    const uint16_t *d, *m;
    void *out;
    int N, K, qtype, out_bf16;
} deq_t;

static void deq_part(void *arg, int part, int n_parts) {
    const deq_t *a = (const deq_t *)arg;
    const int groups = a->N / 16, nb = a->K / 32, qb = packed_quant_bytes(a->qtype);
    const int g0 = (int)((int64_t)groups * part / n_parts), g1 = (int)((int64_t)groups * (part + 1) / n_parts);
    for (int g = g0; g < g1; g++) {
        for (int b = 0; b < nb; b++) {
            const int64_t gb = (int64_t)g * nb + b;
            const uint8_t *q = a->qs + gb * qb * 16;
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->d + gb * 16)));
            __m512 mv = _mm512_setzero_ps();
            if (a->qtype == QT_Q4_1) mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->m + gb * 16)));
            if (a->qtype == QT_Q4_0) mv = _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f));
            for (int i = 0; i < 32; i++) {
                __m512 w;
                if (a->qtype == QT_Q8_0) {
                    w = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i * 16)))));
                } else {
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (i % 16) * 16)));
                    __m512i qi = i < 16 ? _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)) : _mm512_srli_epi32(bytes, 4);
                    w = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(qi), mv);
                }
                const int64_t off = (int64_t)(b * 32 + i) * a->N + g * 16;
                if (a->out_bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + off), (__m256i)_mm512_cvtneps_pbh(w));
                else
                    _mm512_storeu_ps((float *)a->out + off, w);
            }
        }
    }
}

// W transposed, dequantized: out [K, N] (fp32, or bf16 when out_bf16), for torch's GEMM.
int tessera_q_dequantize_t(int qtype, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N, int K,
                           void *out, int out_bf16, int n_threads) {
    if (gguf_block_bytes(qtype) < 0 || N % 16 || K % 32) return -1;
    deq_t a = {qs, d, m, out, N, K, qtype, out_bf16};
    const int groups = N / 16;
    if (n_threads > groups) n_threads = groups;
    if (n_threads < 1) n_threads = 1;
    pool_run(deq_part, &a, n_threads, n_threads);
    return 0;
}

// Rows `ids` of W, dequantized (embedding lookups from a tied, packed embedding matrix).
int tessera_q_gather_rows(int qtype, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N, int K,
                          const int64_t *ids, int n_ids, void *out, int out_bf16) {
    if (gguf_block_bytes(qtype) < 0 || N % 16 || K % 32) return -1;
    const int nb = K / 32, qb = packed_quant_bytes(qtype);
    for (int t = 0; t < n_ids; t++) {
        const int64_t n = ids[t];
        if (n < 0 || n >= N) return -2;
        const int g = (int)(n / 16), r = (int)(n % 16);
        for (int b = 0; b < nb; b++) {
            const int64_t gb = (int64_t)g * nb + b;
            const float dv = half_to_float(d[gb * 16 + r]);
            const float mv = qtype == QT_Q4_1 ? half_to_float(m[gb * 16 + r]) : 0.0f;
            for (int i = 0; i < 32; i++) {
                float w;
                if (qtype == QT_Q8_0) {
                    w = dv * (float)(int8_t)qs[(gb * qb + i) * 16 + r];
                } else {
                    uint8_t byte = qs[(gb * qb + (i % 16)) * 16 + r];
                    int q = i < 16 ? (byte & 0x0F) : (byte >> 4);
                    w = qtype == QT_Q4_1 ? dv * (float)q + mv : dv * (float)(q - 8);
                }
                const int64_t off = (int64_t)t * K + b * 32 + i;
                if (out_bf16)
                    ((uint16_t *)out)[off] = float_to_bf16(w);
                else
                    ((float *)out)[off] = w;
            }
        }
    }
    return 0;
}

#else
int tessera_q_repack(void) { return -100; }
int tessera_q_matmul(void) { return -100; }
int tessera_q_gather_rows(void) { return -100; }
int tessera_q_dequantize_t(void) { return -100; }
#endif
