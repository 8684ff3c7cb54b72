// Fused bf16 element-wise ops that torch runs as several passes (with a rounding after each):
// RMSNorm with the residual add, rotary embedding, SiLU-and-multiply. Each rounds where the
// torch reference rounds, so the results agree to the last bit or nearly.

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "simd.h"

#define PAR_MIN 32768  // elements below which one thread does the job

typedef struct {
    const uint16_t *x, *res, *w;
    uint16_t *out, *res_out;
    int n;
    float eps;
} rms_args;

static void rms_rows(void *p, int lo, int hi) {
    const rms_args *a = (const rms_args *)p;
    const int n = a->n;
    for (int t = lo; t < hi; t++) {
        const uint16_t *x = a->x + (int64_t)t * n;
        uint16_t *out = a->out + (int64_t)t * n;
        __m512 ss = _mm512_setzero_ps();
        int d = 0;
        if (a->res) {  // summed = bf16(x + residual), kept as the new residual
            const uint16_t *r = a->res + (int64_t)t * n;
            uint16_t *ro = a->res_out + (int64_t)t * n;
            for (; d < n; d += 16) {
                __m512 s = round_bf16(_mm512_add_ps(load_bf16(x + d), load_bf16(r + d)));
                store_bf16(ro + d, s);
                ss = _mm512_fmadd_ps(s, s, ss);
            }
            x = ro;
        } else {
            for (; d < n; d += 16) {
                __m512 s = load_bf16(x + d);
                ss = _mm512_fmadd_ps(s, s, ss);
            }
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / n + a->eps));
        for (d = 0; d < n; d += 16) {  // weight * bf16(x * inv), rounded
            __m512 y = round_bf16(_mm512_mul_ps(load_bf16(x + d), inv));
            store_bf16(out + d, _mm512_mul_ps(y, load_bf16(a->w + d)));
        }
    }
}

// x, residual, out, residual_out: [T, N] contiguous, N a multiple of 16; residual may be NULL.
int tessera_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out,
                          uint16_t *residual_out, int T, int N, float eps, int n_threads) {
    if (N % 16 != 0) return -1;
    rms_args a = {x, residual, w, out, residual_out, N, eps};
    parallel_rows(rms_rows, &a, T, (int64_t)T * N < PAR_MIN ? 1 : n_threads);
    return 0;
}

typedef struct {
    uint16_t *x;
    const float *cos, *sin;
    int64_t stride;
    int heads, d;
} rope_args;

static void rope_rows(void *p, int lo, int hi) {
    const rope_args *a = (const rope_args *)p;
    const int half = a->d / 2;
    for (int t = lo; t < hi; t++) {
        uint16_t *row = a->x + (int64_t)t * a->stride;
        for (int i = 0; i < half; i += 16) {
            __m512 c = round_bf16(_mm512_loadu_ps(a->cos + (int64_t)t * half + i));
            __m512 s = round_bf16(_mm512_loadu_ps(a->sin + (int64_t)t * half + i));
            for (int h = 0; h < a->heads; h++) {
                uint16_t *x1 = row + h * a->d + i, *x2 = x1 + half;
                __m512 u = load_bf16(x1), v = load_bf16(x2);
                __m512 o1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(u, c)), round_bf16(_mm512_mul_ps(v, s)));
                __m512 o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(v, c)), round_bf16(_mm512_mul_ps(u, s)));
                store_bf16(x1, o1);
                store_bf16(x2, o2);
            }
        }
    }
}

// In place on x [T, heads*D] with row stride `stride` (elements); cos/sin [T, D/2] fp32.
int tessera_rotary_bf16(uint16_t *x, const float *cos, const float *sin, int T, int heads, int D, int64_t stride,
                        int n_threads) {
    if (D % 32 != 0) return -1;
    rope_args a = {x, cos, sin, stride, heads, D};
    parallel_rows(rope_rows, &a, T, (int64_t)T * heads * D < PAR_MIN ? 1 : n_threads);
    return 0;
}

typedef struct {
    const uint16_t *x;
    uint16_t *out;
    int n;
} silu_args;

static void silu_rows(void *p, int lo, int hi) {
    const silu_args *a = (const silu_args *)p;
    const int n = a->n;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int t = lo; t < hi; t++) {
        const uint16_t *g = a->x + (int64_t)t * 2 * n, *u = g + n;
        uint16_t *out = a->out + (int64_t)t * n;
        for (int i = 0; i < n; i += 16) {
            __m512 x = load_bf16(g + i);
            __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
            store_bf16(out + i, _mm512_mul_ps(s, load_bf16(u + i)));
        }
    }
}

// out [T, N] = bf16(bf16(silu(gate)) * up) for x [T, 2N] = gate then up; N a multiple of 16.
int tessera_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int T, int N, int n_threads) {
    if (N % 16 != 0) return -1;
    silu_args a = {x, out, N};
    parallel_rows(silu_rows, &a, T, (int64_t)T * N < PAR_MIN ? 1 : n_threads);
    return 0;
}

#else
int tessera_rms_norm_bf16(void) { return -100; }
int tessera_rotary_bf16(void) { return -100; }
int tessera_silu_and_mul_bf16(void) { return -100; }
#endif
