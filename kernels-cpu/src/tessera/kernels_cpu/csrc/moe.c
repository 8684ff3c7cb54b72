// The mixture-of-experts MLP with packed expert weights (tessera.kernels.moe.fused_moe), given
// each token's k experts and routing weights:
//   1. group the T*k (token, slot) pairs by expert (count, prefix sum) and gather their rows;
//   2. per active expert, over all its rows at once (its weights read once per step):
//      gate_up product, silu(gate) * up, down product into an fp32 row per pair;
//   3. out[t] = sum over the token's slots j, in top-k order, of w[t, j] * y[t, j], in fp32.
// The products are qmatmul.c's (bf16 x: int8 dot products, fp32 x: FMAs), whose rows are
// independent of the rows beside them; the grouping only decides where a pair's row lives, and
// step 3 sums a token's slots in its own order, so a token's output bits do not depend on the
// batch (batch invariance).

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include "simd.h"

int tessera_q_matmul_ld(int qtype, const void *x, int x_bf16, int M, int K, int N, const uint8_t *qs,
                        const uint16_t *d, const uint16_t *m, const void *bias, void *out, int64_t ldo,
                        int out_bf16, int n_threads);
int tessera_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int T, int N, int n_threads);

typedef struct {
    int H, I, x_bf16, gu_qtype, dn_qtype;
    const int64_t *gu, *dn;  // per expert: qs, d, m (0 for none) addresses
    const int *count, *start;
    const int *active;  // experts with rows, most rows first
    char *xg, *gu_out, *act;  // [R, H], [R, 2I], [R, I] rows in x's dtype, grouped by expert
    float *y;                 // [R, H]
} moe_t;

// fp32 silu(gate) * up: gu [rows, 2I] (gate, then up) -> act [rows, I]
static void silu_mul_f32(const float *gu, float *act, int rows, int I) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < rows; r++) {
        const float *g = gu + (int64_t)r * 2 * I, *u = g + I;
        for (int i = 0; i < I; i += 16) {
            const __m512 x = _mm512_loadu_ps(g + i);
            const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            _mm512_storeu_ps(act + (int64_t)r * I + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
        }
    }
}

static int run_expert(const moe_t *a, int e, int n_threads) {
    const int M = a->count[e], H = a->H, I = a->I;
    const int64_t r0 = a->start[e];
    const size_t xs = a->x_bf16 ? 2 : 4;
    const int64_t *gu = a->gu + 3 * e, *dn = a->dn + 3 * e;
    char *gu_out = a->gu_out + r0 * 2 * I * xs, *act = a->act + r0 * I * xs;
    int rc = tessera_q_matmul_ld(a->gu_qtype, a->xg + r0 * H * xs, a->x_bf16, M, H, 2 * I, (const uint8_t *)gu[0],
                                 (const uint16_t *)gu[1], (const uint16_t *)gu[2], NULL, gu_out, 2 * I, a->x_bf16,
                                 n_threads);
    if (rc) return rc;
    if (a->x_bf16)
        rc = tessera_silu_and_mul_bf16((const uint16_t *)gu_out, (uint16_t *)act, M, I, n_threads);
    else
        silu_mul_f32((const float *)gu_out, (float *)act, M, I);
    if (rc) return rc;
    return tessera_q_matmul_ld(a->dn_qtype, act, a->x_bf16, M, I, H, (const uint8_t *)dn[0], (const uint16_t *)dn[1],
                               (const uint16_t *)dn[2], NULL, a->y + r0 * H, H, 0, n_threads);
}

typedef struct {
    const moe_t *a;
    int rc;
} experts_job;

static void expert_part(void *arg, int part, int n_parts) {
    (void)n_parts;
    experts_job *j = (experts_job *)arg;
    const int rc = run_expert(j->a, j->a->active[part], 1);
    if (rc) j->rc = rc;  // any failure's code will do
}

typedef struct {
    const float *w, *y;
    const int *pos;
    void *out;
    int H, k, out_bf16;
} combine_t;

static void combine_rows(void *arg, int lo, int hi) {
    const combine_t *c = (const combine_t *)arg;
    for (int t = lo; t < hi; t++) {
        for (int h = 0; h < c->H; h += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int j = 0; j < c->k; j++) {
                const int64_t p = (int64_t)t * c->k + j;
                const __m512 v = _mm512_mul_ps(_mm512_set1_ps(c->w[p]), _mm512_loadu_ps(c->y + (int64_t)c->pos[p] * c->H + h));
                acc = j == 0 ? v : _mm512_add_ps(acc, v);
            }
            const int64_t off = (int64_t)t * c->H + h;
            if (c->out_bf16)
                store_bf16((uint16_t *)c->out + off, acc);
            else
                _mm512_storeu_ps((float *)c->out + off, acc);
        }
    }
}

// The caller's scratch, carved into the step's buffers (64-byte aligned): per expert counts,
// starts, fill levels and the active list, per pair its row and weight, then the rows.
typedef struct {
    int *count, *start, *fill, *active, *pos;
    float *wn, *y;
    char *xg, *gu_out, *act;
} moe_scratch;

static int64_t carve(moe_scratch *s, char *base, int64_t T, int H, int I, int E, int k, int x_bf16) {
    const int64_t R = T * k, xs = x_bf16 ? 2 : 4;
    int64_t off = 0;
#define TAKE(field, bytes)                                \
    do {                                                  \
        if (base) s->field = (void *)(base + off);        \
        off += ((int64_t)(bytes) + 63) / 64 * 64;         \
    } while (0)
    TAKE(count, 4 * E);
    TAKE(start, 4 * E);
    TAKE(fill, 4 * E);
    TAKE(active, 4 * E);
    TAKE(pos, 4 * R);
    TAKE(wn, 4 * R);
    TAKE(y, 4 * R * H);
    TAKE(xg, xs * R * H);
    TAKE(gu_out, xs * R * 2 * I);
    TAKE(act, xs * R * I);
#undef TAKE
    return off;
}

// Bytes of scratch tessera_moe needs for T tokens (the caller keeps it between steps: fresh
// pages would cost a fault and zeroing each).
int64_t tessera_moe_scratch_bytes(int T, int H, int I, int E, int k, int x_bf16) {
    return carve(NULL, NULL, T, H, I, E, k, x_bf16);
}

// x [T, H] (bf16 when x_bf16, else fp32) -> out [T, H] (x's dtype). ids, w [T, k]: each token's
// experts and routing weights in top-k order (renormalized here to sum 1 when renormalize).
// gu / dn: per expert (qs, d, m) of the repacked gate_up [2I, H] and down [H, I] (qmatmul.c).
// scratch: 64-byte aligned, tessera_moe_scratch_bytes long. Returns 0; -1 for shapes the
// kernels do not take; -2 for an expert id outside 0..E-1; -3 when out of memory.
int tessera_moe(const void *x, int x_bf16, int T, int H, int I, int E, int k, const int64_t *ids, const float *w,
                int renormalize, int gu_qtype, const int64_t *gu, int dn_qtype, const int64_t *dn, void *out,
                void *scratch, int n_threads) {
    if (T <= 0 || k <= 0 || E <= 0 || H % 32 || I % 32 || (uintptr_t)scratch % 64) return -1;
    const int64_t R = (int64_t)T * k;
    for (int64_t p = 0; p < R; p++)
        if (ids[p] < 0 || ids[p] >= E) return -2;
    const size_t xs = x_bf16 ? 2 : 4;
    moe_scratch sc;
    carve(&sc, scratch, T, H, I, E, k, x_bf16);
    int *count = sc.count, *start = sc.start, *fill = sc.fill, *active = sc.active, *pos = sc.pos;
    float *wn = sc.wn, *y = sc.y;
    char *xg = sc.xg, *gu_out = sc.gu_out, *act = sc.act;
    memset(count, 0, sizeof(int) * (size_t)E);
    memset(fill, 0, sizeof(int) * (size_t)E);

    for (int t = 0; t < T; t++) {
        const float *wt = w + (int64_t)t * k;
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += wt[j];
        for (int j = 0; j < k; j++) wn[(int64_t)t * k + j] = renormalize ? wt[j] / sum : wt[j];
    }
    for (int64_t p = 0; p < R; p++) count[ids[p]]++;
    int n_active = 0, max_count = 0;
    for (int e = 0, s = 0; e < E; s += count[e], e++) {
        start[e] = s;
        if (count[e]) active[n_active++] = e;
        if (count[e] > max_count) max_count = count[e];
    }
    for (int64_t p = 0; p < R; p++) {  // pairs in token order within each expert
        const int e = (int)ids[p];
        pos[p] = start[e] + fill[e]++;
        memcpy(xg + (int64_t)pos[p] * H * xs, (const char *)x + (p / k) * H * xs, (size_t)H * xs);
    }
    for (int i = 1; i < n_active; i++) {  // most rows first, for the dynamic schedule below
        const int e = active[i];
        int j = i;
        for (; j > 0 && count[active[j - 1]] < count[e]; j--) active[j] = active[j - 1];
        active[j] = e;
    }

    moe_t a = {H, I, x_bf16, gu_qtype, dn_qtype, gu, dn, count, start, active, xg, gu_out, act, y};
    // Many experts, none holding most rows: one expert per thread at a time (no barrier per
    // product); else each product split by output rows over all threads. Same bits either way.
    int rc = 0;
    if (n_threads > 1 && n_active >= 2 * n_threads && (int64_t)max_count * n_threads <= R) {
        experts_job job = {&a, 0};
        pool_run(expert_part, &job, n_active, n_threads);
        rc = job.rc;
    } else {
        for (int i = 0; i < n_active && !rc; i++) rc = run_expert(&a, active[i], n_threads);
    }
    if (rc) return rc;
    combine_t c = {wn, y, pos, out, H, k, x_bf16};
    parallel_rows(combine_rows, &c, T, (int64_t)T * H * k < (1 << 16) ? 1 : n_threads);
    return 0;
}

#else
int tessera_moe(void) { return -100; }
int64_t tessera_moe_scratch_bytes(void) { return -100; }
#endif
