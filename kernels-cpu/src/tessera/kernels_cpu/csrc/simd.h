// Shared AVX-512 helpers of the C kernels.
#pragma once
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>

// e^x as 2^(x log2 e) with a degree-6 polynomial on the fraction, within a few ulp; inputs
// below -100 (-inf included) give about 4e-44, a denormal; inputs above 88.7 give inf.
static inline __m512 exp_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    __m512 t = _mm512_mul_ps(x, log2e);
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);  // in [-0.5, 0.5]
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// bf16 <-> fp32 for 16 lanes
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 round_bf16(__m512 x) {  // x rounded to bf16, as fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
static inline void store_bf16(uint16_t *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x)); }

#include "pool.h"

// Rows [0, n) in n_threads contiguous parts; small jobs stay on the calling thread.
typedef void (*range_fn)(void *arg, int lo, int hi);
typedef struct { range_fn fn; void *arg; int n; } range_job;
static void range_part(void *p, int part, int n_parts) {
    const range_job *j = (const range_job *)p;
    j->fn(j->arg, (int)((int64_t)j->n * part / n_parts), (int)((int64_t)j->n * (part + 1) / n_parts));
}
static inline void parallel_rows(range_fn fn, void *arg, int n, int n_threads) {
    if (n_threads > n) n_threads = n;
    if (n_threads <= 1) { fn(arg, 0, n); return; }
    range_job j = {fn, arg, n};
    pool_run(range_part, &j, n_threads, n_threads);
}
