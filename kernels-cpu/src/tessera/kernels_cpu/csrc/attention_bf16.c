// Flash attention over a paged bf16 KV cache with AVX512-BF16 dot products.
//
// One call handles every query run of a step. A work item is (sequence, KV head, tile of
// query tokens); the rows of a tile are its tokens times the query heads that share the KV head
// (GQA), so each key is read once per tile for all of them. Keys are visited in tiles of 64:
// the tile is repacked from the paged cache into the pair-interleaved layout vdpbf16ps wants,
// scores go to a small fp32 buffer, an online softmax updates each row's max and sum, and the
// probabilities (bf16) multiply the repacked V tile into fp32 accumulators.
//
// Batch invariance: a row's result depends only on its query, its position and the cache, never
// on the other rows of its tile, how its run was chunked, or which layout ran it. Every row does
// the same arithmetic in the same order: key tiles start at multiples of 64 (absolute positions),
// each score is one vdpbf16ps chain over the head's dimension pairs, the tile's weights are
// rounded to bf16 and summed (as are the P V products) by vdpbf16ps over the key pairs in order,
// and keys a row does not see add exact zeros. The decode layout (a few new tokens) only puts
// other things in the lanes: keys for the scores, dims for P V.
//
// Built at first use with the machine's C compiler (see native.py); without AVX512-BF16 the
// library reports so and Python keeps its other path.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TESSERA_HAVE_BF16 1
#include "simd.h"
#else
#define TESSERA_HAVE_BF16 0
#endif

// what every C kernel of the library needs: AVX512-BF16 here, VNNI for the packed products
int tessera_attention_bf16_supported(void) {
#if defined(__AVX512VNNI__)
    return TESSERA_HAVE_BF16;
#else
    return 0;
#endif
}

#if TESSERA_HAVE_BF16

#define BK 64        // keys per tile
#define NR 64        // query rows per tile: tokens x query heads of one KV head, padded
#define MAX_RV (NR / 16)
#define MAX_D 256    // head size

typedef struct {
    const uint16_t *q;           // [T, H, D]
    const uint16_t *k_cache;     // [NB, BS, KH, D]
    const uint16_t *v_cache;
    const int32_t *qsl;          // [S + 1]
    const int32_t *seq_lens;     // [S]
    const int32_t *block_tables; // [S, bt_stride]
    const int32_t *seqs;         // the sequences to run
    int n_seqs, bt_stride, H, KH, D, BS, window;
    float scale;
    uint16_t *out;               // [T, H, D]
    int64_t *items;              // packed (sequence index, kv head, first token of the tile)
    int n_items;
    int unit;                    // items per claim: all KV heads of a run at once when there are many
    int next;                    // atomic cursor over claims
    int failed;                  // set by a thread that could not get its scratch memory
} job_t;

typedef struct {
    uint32_t *qp;   // [D/2][NR]: dims 2j, 2j+1 of each row's query
    float *st;      // [BK][NR]: scores, keys by rows
    uint32_t *pp;   // [BK/2][NR]: probabilities of keys 2p, 2p+1 per row (bf16 pairs)
    uint32_t *vp;   // [BK/2][D]: dim d of keys 2p, 2p+1 (bf16 pairs)
    float *ot;      // [D][NR]: output accumulators, dims by rows
    uint16_t *zero; // a zero key/value row
} scratch_t;


// Offsets in the cache of the K/V rows of keys [k0, k0 + nk) of one KV head, stepping through
// the block table with one division per tile.
static inline void key_rows(const job_t *jb, const int32_t *table, int kh, int k0, int nk, int64_t *row_off) {
    int blk = k0 / jb->BS, off = k0 % jb->BS;
    for (int kk = 0; kk < nk; kk++) {
        row_off[kk] = (((int64_t)table[blk] * jb->BS + off) * jb->KH + kh) * jb->D;
        if (++off == jb->BS) {
            off = 0;
            blk++;
        }
    }
}

// The first key tile a query at `pos` visits: the tile (at a multiple of BK) holding its first
// visible key, whatever the tile of queries it rides in, so its keys are always summed in the
// same groups.
static inline int first_key_tile(int pos, int W) {
    const int lo = W > 0 && pos - W + 1 > 0 ? pos - W + 1 : 0;
    return lo / BK * BK;
}

// fp32 -> bf16 bits, round to nearest even (finite values), the same in both layouts
static inline uint16_t bf16_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}
static inline __m256i bf16_bits16(__m512 x) {
    __m512i b = _mm512_castps_si512(x);
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

// two bf16 ones: vdpbf16ps with it adds a pair of weights to a row's normaliser
#define BF16_ONE_PAIR 0x3F803F80

#define DECODE_Q 4  // runs of at most this many new tokens take the decode layout
#define DECODE_G 16

static inline int decode_layout(int nq, int G) { return nq <= DECODE_Q && G <= DECODE_G; }

// Query tokens per tile for a run of nq tokens: as few tiles of at most NR rows as possible,
// split evenly, so that a 32-token run of 3 heads per KV head makes two tiles of 48 rows.
static inline int tile_tokens(int nq, int G) {
    if (nq <= 0) return 1;  // a sequence with nothing new this step: no tiles
    if (decode_layout(nq, G)) return 1;  // one token per item
    const int most = NR / G;  // whole tokens that fit in a tile
    const int tiles = (nq + most - 1) / most;
    return (nq + tiles - 1) / tiles;
}

// RV (row vectors of 16) is a constant at each call site, so the loops over it unroll.
static inline __attribute__((always_inline)) void run_item_rv(const job_t *jb, int64_t item, const scratch_t *sc,
                                                              const int RV) {
    const int si = (int)(item >> 40), kh = (int)((item >> 24) & 0xFFFF), t0 = (int)(item & 0xFFFFFF);
    const int seq = jb->seqs[si];
    const int D = jb->D, P = D / 2, H = jb->H, G = H / jb->KH, W = jb->window;
    const int q_start = jb->qsl[seq], q_end = jb->qsl[seq + 1], seq_len = jb->seq_lens[seq];
    const int first_pos = seq_len - (q_end - q_start);  // position of the run's first query
    const int bq = tile_tokens(q_end - q_start, G);
    const int nt = (q_end - q_start - t0) < bq ? (q_end - q_start - t0) : bq;
    const int R = nt * G;
    const int32_t *table = jb->block_tables + (int64_t)seq * jb->bt_stride;
    const int p_lo = first_pos + t0, p_hi = first_pos + t0 + nt - 1;  // the tile's query positions
    const int k_lo = first_key_tile(p_lo, W);
    const int k_end = p_hi + 1;

    // queries, pair-packed by rows; padding rows are zero and see every key of the tile
    int32_t qpos_a[NR];
    for (int r = 0; r < 16 * RV; r++) {
        const uint32_t *src = r < R ? (const uint32_t *)(jb->q + ((int64_t)(q_start + t0 + r / G) * H + kh * G + r % G) * D)
                                    : (const uint32_t *)sc->zero;
        for (int j = 0; j < P; j++) sc->qp[j * NR + r] = src[j];
        qpos_a[r] = r < R ? p_lo + r / G : p_hi;
    }
    __m512i qpos[MAX_RV], qlo[MAX_RV];
    __m512 m[MAX_RV], l[MAX_RV];
    for (int v = 0; v < RV; v++) {
        qpos[v] = _mm512_loadu_si512(qpos_a + 16 * v);
        qlo[v] = _mm512_sub_epi32(qpos[v], _mm512_set1_epi32(W > 0 ? W : 1 << 30));  // keys > qlo
        m[v] = _mm512_set1_ps(-INFINITY);
        l[v] = _mm512_setzero_ps();
    }
    for (int d = 0; d < D; d++) memset(sc->ot + d * NR, 0, sizeof(float) * 16 * RV);
    const __m512 scale = _mm512_set1_ps(jb->scale);
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    const __m512i ones = _mm512_set1_epi32(BF16_ONE_PAIR);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i lo_pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                              39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_pairs = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                              55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);

    for (int k0 = k_lo; k0 < k_end; k0 += BK) {
        const int nk = (k_end - k0) < BK ? (k_end - k0) : BK;
        const int nk4 = (nk + 3) & ~3;
        int64_t row_off[BK];
        key_rows(jb, table, kh, k0, nk, row_off);
        // S^T = K Q^T (unscaled): 4 keys x 64 rows per pass, keys broadcast straight from the
        // paged cache; where no key of the tile is masked, the row maxima are taken here
        const int need_mask = k0 + nk - 1 > p_lo || (W > 0 && k0 <= p_hi - W);
        __m512 mx[MAX_RV];
        for (int v = 0; v < RV; v++) mx[v] = neg_inf;
        for (int kk = 0; kk < nk4; kk += 4) {
            const uint32_t *kr[4];
            for (int a = 0; a < 4; a++)
                kr[a] = kk + a < nk ? (const uint32_t *)(jb->k_cache + row_off[kk + a]) : (const uint32_t *)sc->zero;
            __m512 acc[4][MAX_RV];
            for (int a = 0; a < 4; a++)
                for (int v = 0; v < RV; v++) acc[a][v] = _mm512_setzero_ps();
            for (int j = 0; j < P; j++) {
                __m512bh qv[MAX_RV];
                for (int v = 0; v < RV; v++) qv[v] = (__m512bh)_mm512_loadu_si512(sc->qp + j * NR + 16 * v);
                for (int a = 0; a < 4; a++) {
                    __m512bh b = (__m512bh)_mm512_set1_epi32((int)kr[a][j]);
                    for (int v = 0; v < RV; v++) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], b, qv[v]);
                }
            }
            for (int a = 0; a < 4 && kk + a < nk; a++)
                for (int v = 0; v < RV; v++) {
                    _mm512_storeu_ps(sc->st + (kk + a) * NR + 16 * v, acc[a][v]);
                    if (!need_mask) mx[v] = _mm512_max_ps(mx[v], acc[a][v]);
                }
        }
        // causal and window masks (-inf), on the tiles that cross them
        if (need_mask) {
            for (int kk = 0; kk < nk; kk++) {
                __m512i kpos = _mm512_set1_epi32(k0 + kk);
                for (int v = 0; v < RV; v++) {
                    __m512 x = _mm512_loadu_ps(sc->st + kk * NR + 16 * v);
                    __mmask16 ok = _mm512_cmple_epi32_mask(kpos, qpos[v]) & _mm512_cmpgt_epi32_mask(kpos, qlo[v]);
                    x = _mm512_mask_blend_ps(ok, neg_inf, x);
                    _mm512_storeu_ps(sc->st + kk * NR + 16 * v, x);
                    mx[v] = _mm512_max_ps(mx[v], x);
                }
            }
        }
        // the online-softmax correction (maxima in scaled units; the scale is positive)
        __m512 alpha[MAX_RV], msafe[MAX_RV];
        int rescale = 0;
        for (int v = 0; v < RV; v++) {
            __m512 m_new = _mm512_max_ps(m[v], _mm512_mul_ps(mx[v], scale));
            __mmask16 seen = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ);
            msafe[v] = _mm512_maskz_mov_ps(seen, m_new);  // rows with nothing visible yet: 0
            alpha[v] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m[v], neg_inf, _CMP_NEQ_OQ),
                                           exp_ps(_mm512_sub_ps(m[v], msafe[v])));
            rescale |= _mm512_cmp_ps_mask(m[v], m_new, _CMP_NEQ_OQ) != 0;
            m[v] = m_new;
            l[v] = _mm512_mul_ps(l[v], alpha[v]);
        }
        // P^T, pair-packed: word (p, r) holds rows r's weights for keys 2p and 2p+1
        const int np = (nk + 1) / 2;
        for (int p = 0; p < np; p++) {
            for (int v = 0; v < RV; v++) {
                // masked scores (-inf) come out of exp_ps below 2^-126, and the bf16 conversion
                // flushes such denormals to zero: they add nothing to the sum or to O
                __m512 x0 = _mm512_loadu_ps(sc->st + (2 * p) * NR + 16 * v);
                __m512 e0 = exp_ps(_mm512_fmsub_ps(x0, scale, msafe[v]));
                __m512 e1 = _mm512_setzero_ps();
                if (2 * p + 1 < nk) {
                    __m512 x1 = _mm512_loadu_ps(sc->st + (2 * p + 1) * NR + 16 * v);
                    e1 = exp_ps(_mm512_fmsub_ps(x1, scale, msafe[v]));
                }
                __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // [e0 x16 | e1 x16]
                packed = _mm512_permutexvar_epi16(interleave, packed);
                // the normaliser sums the rounded weights, the ones that multiply V, pair by pair
                l[v] = _mm512_dpbf16_ps(l[v], (__m512bh)ones, (__m512bh)packed);
                _mm512_storeu_si512(sc->pp + p * NR + 16 * v, packed);
            }
        }
        // V, pair-packed by keys
        for (int p = 0; p < np; p++) {
            const uint16_t *v0 = jb->v_cache + row_off[2 * p];
            const uint16_t *v1 = 2 * p + 1 < nk ? jb->v_cache + row_off[2 * p + 1] : sc->zero;
            for (int d = 0; d < D; d += 32) {
                __m512i a = _mm512_loadu_si512(v0 + d), b = _mm512_loadu_si512(v1 + d);
                _mm512_storeu_si512(sc->vp + p * D + d, _mm512_permutex2var_epi16(a, lo_pairs, b));
                _mm512_storeu_si512(sc->vp + p * D + d + 16, _mm512_permutex2var_epi16(a, hi_pairs, b));
            }
        }
        // O^T = alpha O^T + V^T P^T: 4 dims x 64 rows per pass
        for (int d = 0; d < D; d += 4) {
            __m512 acc[4][MAX_RV];
            for (int a = 0; a < 4; a++)
                for (int v = 0; v < RV; v++) {
                    acc[a][v] = _mm512_loadu_ps(sc->ot + (d + a) * NR + 16 * v);
                    if (rescale) acc[a][v] = _mm512_mul_ps(acc[a][v], alpha[v]);
                }
            for (int p = 0; p < np; p++) {
                __m512bh pv[MAX_RV];
                for (int v = 0; v < RV; v++) pv[v] = (__m512bh)_mm512_loadu_si512(sc->pp + p * NR + 16 * v);
                for (int a = 0; a < 4; a++) {
                    __m512bh b = (__m512bh)_mm512_set1_epi32((int)sc->vp[p * D + d + a]);
                    for (int v = 0; v < RV; v++) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], b, pv[v]);
                }
            }
            for (int a = 0; a < 4; a++)
                for (int v = 0; v < RV; v++) _mm512_storeu_ps(sc->ot + (d + a) * NR + 16 * v, acc[a][v]);
        }
    }
    // out = O / l, rounded to bf16
    float inv[NR];
    for (int v = 0; v < RV; v++) _mm512_storeu_ps(inv + 16 * v, _mm512_div_ps(_mm512_set1_ps(1.0f), l[v]));
    for (int r = 0; r < R; r++) {
        uint16_t *dst = jb->out + ((int64_t)(q_start + t0 + r / G) * H + kh * G + r % G) * D;
        for (int d = 0; d < D; d++) dst[d] = bf16_bits(sc->ot[d * NR + r] * inv[r]);
    }
}

// Decode-sized runs (a few new tokens, at most 16 query heads per KV head) would leave most of
// the 16 row lanes above empty, so they take a layout of their own: one query token per item,
// keys in the lanes for the scores (the K tile repacked transposed) and dims in the lanes for
// P V. Per row it is the arithmetic of the tile layout, operation for operation: the same
// vdpbf16ps chains (same operands, same order), maxima, exponentials, bf16 weights and
// normaliser, so a token gets the same bits here as inside a prefill tile.

// r[i] (16 dwords each) -> r[j] holds dword j of every r[i], in lane i
static inline void transpose16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    __m512i u[16];  // u[4b + k], 128-bit lane L: dword 4L + k of rows 4b..4b+3
    for (int b = 0; b < 4; b++) {
        u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
        u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xdd);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xdd);
        r[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[8 + k] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        r[4 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

static inline float lane0(__m512 x) { return _mm512_cvtss_f32(x); }

// KV heads [kh0, kh1) of one query token (the item's), all of them over each tile of keys:
// the K/V rows of a token hold every KV head side by side, so running them together reads
// the cache blocks front to back once. DC, GC: the head size and query heads per KV head as
// constants (0: read at run time), so the loops over them unroll for the common shapes.
#define DECODE_MAX_ROWS 64  // (kh1 - kh0) * G
static inline __attribute__((always_inline)) void run_decode_t(const job_t *jb, int64_t item, const scratch_t *sc,
                                                               int kh0, int kh1, const int DC, const int GC) {
    const int si = (int)(item >> 40), t = (int)(item & 0xFFFFFF);
    const int seq = jb->seqs[si];
    const int D = DC ? DC : jb->D, P = D / 2, H = jb->H, G = GC ? GC : H / jb->KH, W = jb->window;
    const int q_start = jb->qsl[seq], nq = jb->qsl[seq + 1] - q_start;
    const int pos = jb->seq_lens[seq] - nq + t;
    const int k_lo = first_key_tile(pos, W), k_end = pos + 1;
    const int32_t *table = jb->block_tables + (int64_t)seq * jb->bt_stride;
    const int nr = (kh1 - kh0) * G, row_bytes = jb->KH * D * 2;
    // rows r = (kh - kh0) G + g; word j of row r: q32[r P + j]
    const uint32_t *q32 = (const uint32_t *)(jb->q + ((int64_t)(q_start + t) * H + kh0 * G) * D);
    float m[DECODE_MAX_ROWS], l[DECODE_MAX_ROWS], alpha[DECODE_MAX_ROWS];
    for (int r = 0; r < nr; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    float *o = sc->ot;      // [nr][D]
    uint32_t *kt = sc->qp;  // [BK/16][P][16]: dimension pair j of 16 keys, keys in lanes
    float *s = sc->st;      // [G][BK]: one KV head's scores
    uint32_t *pw = sc->pp;  // [G][BK/2]: its weights, bf16 pairs of keys
    memset(o, 0, sizeof(float) * nr * D);
    const __m512 scale = _mm512_set1_ps(jb->scale), neg_inf = _mm512_set1_ps(-INFINITY);
    const __m512i ones = _mm512_set1_epi32(BF16_ONE_PAIR);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lo_pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                              39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_pairs = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                              55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (int k0 = k_lo; k0 < k_end; k0 += BK) {
        const int nk = (k_end - k0) < BK ? (k_end - k0) : BK;
        const int ng = (nk + 15) / 16, np = (nk + 1) / 2;
        int64_t row_off[BK];  // of KV head 0
        key_rows(jb, table, 0, k0, nk, row_off);
        // the cache rows are scattered over blocks and rarely in cache: the next tile's rows
        // are asked for (into L2: a tile's rows need more than L1 holds) one row per key while
        // this tile's K rows are repacked and its V rows multiplied, so the loads overlap the
        // work without a burst of prefetches that would stall the core (the first tile's rows
        // were asked for by the previous item, see prefetch_first_keys)
        int64_t next_off[BK];
        const int nn = k0 + BK < k_end ? ((k_end - k0 - BK) < BK ? (k_end - k0 - BK) : BK) : 0;
        if (nn) key_rows(jb, table, 0, k0 + BK, nn, next_off);
        const int pf_lo = kh0 * D * 2, pf_hi = kh1 * D * 2 < row_bytes ? kh1 * D * 2 : row_bytes;
        for (int kh = kh0; kh < kh1; kh++) {
            const int r0 = (kh - kh0) * G;
            // K^T: 16 keys x 16 pairs at a time
            for (int c = 0; c < ng; c++) {
                if (kh == kh0)
                    for (int kk = 16 * c; kk < 16 * c + 16 && kk < nn; kk++)
                        for (int b = pf_lo; b < pf_hi; b += 64)
                            _mm_prefetch((const char *)(jb->k_cache + next_off[kk]) + b, _MM_HINT_T1);
                for (int j0 = 0; j0 < P; j0 += 16) {
                    __m512i rows[16];
                    for (int i = 0; i < 16; i++)
                        rows[i] = 16 * c + i < nk ? _mm512_loadu_si512(jb->k_cache + row_off[16 * c + i] + kh * D + 2 * j0)
                                                  : _mm512_setzero_si512();
                    transpose16(rows);
                    for (int i = 0; i < 16; i++) _mm512_storeu_si512(kt + ((int64_t)c * P + j0 + i) * 16, rows[i]);
                }
            }
            // scores (unscaled) of 4 heads x 64 keys per pass
            for (int g0 = 0; g0 < G; g0 += 4) {
                const int na = (G - g0) < 4 ? (G - g0) : 4;
                __m512 acc[4][BK / 16];
                for (int a = 0; a < 4; a++)
                    for (int c = 0; c < BK / 16; c++) acc[a][c] = _mm512_setzero_ps();
                for (int j = 0; j < P; j++) {
                    __m512bh kv[BK / 16];
                    for (int c = 0; c < ng; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kt + ((int64_t)c * P + j) * 16);
                    for (int a = 0; a < na; a++) {
                        const __m512bh b = (__m512bh)_mm512_set1_epi32((int)q32[(int64_t)(r0 + g0 + a) * P + j]);
                        for (int c = 0; c < ng; c++) acc[a][c] = _mm512_dpbf16_ps(acc[a][c], kv[c], b);
                    }
                }
                for (int a = 0; a < na; a++)
                    for (int c = 0; c < ng; c++) _mm512_storeu_ps(s + (g0 + a) * BK + 16 * c, acc[a][c]);
            }
            // online softmax per head; masked keys and those past the tile weigh exactly 0
            for (int g = 0; g < G; g++) {
                const int r = r0 + g;
                __m512 x[BK / 16], mx = neg_inf;
                for (int c = 0; c < ng; c++) {
                    const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * c));
                    __mmask16 ok = _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(nk));
                    if (W > 0) ok &= _mm512_cmpgt_epi32_mask(_mm512_add_epi32(key, _mm512_set1_epi32(k0)),
                                                             _mm512_set1_epi32(pos - W));
                    x[c] = _mm512_mask_blend_ps(ok, neg_inf, _mm512_loadu_ps(s + g * BK + 16 * c));
                    mx = _mm512_max_ps(mx, x[c]);
                }
                const __m512 mv = _mm512_set1_ps(m[r]);
                const __m512 m_new = _mm512_max_ps(mv, _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(mx)), scale));
                const __m512 msafe = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ), m_new);
                const __m512 al = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mv, neg_inf, _CMP_NEQ_OQ),
                                                      exp_ps(_mm512_sub_ps(mv, msafe)));
                m[r] = lane0(m_new);
                l[r] = lane0(_mm512_mul_ps(_mm512_set1_ps(l[r]), al));
                alpha[r] = lane0(al);
                for (int c = 0; c < ng; c += 2) {
                    const __m512 e0 = exp_ps(_mm512_fmsub_ps(x[c], scale, msafe));
                    const __m512 e1 = c + 1 < ng ? exp_ps(_mm512_fmsub_ps(x[c + 1], scale, msafe)) : _mm512_setzero_ps();
                    _mm512_storeu_si512(pw + g * (BK / 2) + 8 * c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
                }
            }
            // O = alpha O + V^T P and l = alpha l + the weights, pair by pair: 4 heads x 64 dims
            for (int g0 = 0; g0 < G; g0 += 4) {
                const int na = (G - g0) < 4 ? (G - g0) : 4;
                for (int d0 = 0; d0 < D; d0 += 64) {
                    const int nc = (D - d0) >= 64 ? 4 : (D - d0) / 16;
                    const int first = d0 == 0;
                    __m512 acc[4][4], lacc[4];
                    for (int a = 0; a < na; a++) {
                        const int r = r0 + g0 + a;
                        const __m512 al = _mm512_set1_ps(alpha[r]);
                        for (int c = 0; c < nc; c++)
                            acc[a][c] = _mm512_mul_ps(_mm512_loadu_ps(o + (int64_t)r * D + d0 + 16 * c), al);
                        lacc[a] = _mm512_set1_ps(l[r]);
                    }
                    for (int p = 0; p < np; p++) {
                        if (kh == kh0 && g0 == 0 && d0 == 0)  // the next tile's V rows, two per pair
                            for (int kk = 2 * p; kk < 2 * p + 2 && kk < nn; kk++)
                                for (int b = pf_lo; b < pf_hi; b += 64)
                                    _mm_prefetch((const char *)(jb->v_cache + next_off[kk]) + b, _MM_HINT_T1);
                        // V of keys 2p, 2p+1, pair-interleaved (as the tile layout packs it)
                        const uint16_t *v0 = jb->v_cache + row_off[2 * p] + kh * D + d0;
                        const uint16_t *v1 = 2 * p + 1 < nk ? jb->v_cache + row_off[2 * p + 1] + kh * D + d0 : sc->zero;
                        __m512bh vv[4];
                        for (int c = 0; c < nc; c += 2) {
                            const __m512i a = _mm512_loadu_si512(v0 + 16 * c), b = _mm512_loadu_si512(v1 + 16 * c);
                            vv[c] = (__m512bh)_mm512_permutex2var_epi16(a, lo_pairs, b);
                            vv[c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, hi_pairs, b);
                        }
                        for (int a = 0; a < na; a++) {
                            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[(g0 + a) * (BK / 2) + p]);
                            for (int c = 0; c < nc; c++) acc[a][c] = _mm512_dpbf16_ps(acc[a][c], vv[c], w);
                            if (first) lacc[a] = _mm512_dpbf16_ps(lacc[a], (__m512bh)ones, w);
                        }
                    }
                    for (int a = 0; a < na; a++) {
                        const int r = r0 + g0 + a;
                        for (int c = 0; c < nc; c++) _mm512_storeu_ps(o + (int64_t)r * D + d0 + 16 * c, acc[a][c]);
                        if (first) l[r] = lane0(lacc[a]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        uint16_t *dst = jb->out + ((int64_t)(q_start + t) * H + kh0 * G + r) * D;
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i *)(dst + d), bf16_bits16(_mm512_mul_ps(_mm512_loadu_ps(o + (int64_t)r * D + d), inv)));
    }
}

static void run_decode(const job_t *jb, int64_t item, const scratch_t *sc, int kh0, int kh1) {
    const int G = jb->H / jb->KH;
#define DEC_G(DC)                                                        \
    switch (G) {                                                         \
        case 1: run_decode_t(jb, item, sc, kh0, kh1, DC, 1); return;     \
        case 2: run_decode_t(jb, item, sc, kh0, kh1, DC, 2); return;     \
        case 3: run_decode_t(jb, item, sc, kh0, kh1, DC, 3); return;     \
        case 4: run_decode_t(jb, item, sc, kh0, kh1, DC, 4); return;     \
        case 5: run_decode_t(jb, item, sc, kh0, kh1, DC, 5); return;     \
        case 6: run_decode_t(jb, item, sc, kh0, kh1, DC, 6); return;     \
        case 7: run_decode_t(jb, item, sc, kh0, kh1, DC, 7); return;     \
        case 8: run_decode_t(jb, item, sc, kh0, kh1, DC, 8); return;     \
        default: run_decode_t(jb, item, sc, kh0, kh1, DC, 0); return;    \
    }
    if (jb->D == 64) DEC_G(64)
    if (jb->D == 128) DEC_G(128)
#undef DEC_G
    run_decode_t(jb, item, sc, kh0, kh1, 0, 0);
}

static void run_item(const job_t *jb, int64_t item, const scratch_t *sc) {
    const int seq = jb->seqs[(int)(item >> 40)], t0 = (int)(item & 0xFFFFFF);
    const int nq = jb->qsl[seq + 1] - jb->qsl[seq];
    if (decode_layout(nq, jb->H / jb->KH)) {
        const int kh = (int)((item >> 24) & 0xFFFF);
        run_decode(jb, item, sc, kh, kh + 1);
        return;
    }
    const int bq = tile_tokens(nq, jb->H / jb->KH);
    const int nt = (nq - t0) < bq ? (nq - t0) : bq;
    switch ((nt * (jb->H / jb->KH) + 15) / 16) {
    case 1: run_item_rv(jb, item, sc, 1); break;
    case 2: run_item_rv(jb, item, sc, 2); break;
    case 3: run_item_rv(jb, item, sc, 3); break;
    default: run_item_rv(jb, item, sc, 4); break;
    }
}

// Prefetch the key and value rows of an item's first tile of keys.
static void prefetch_first_keys(const job_t *jb, int64_t item) {
    const int si = (int)(item >> 40), kh = (int)((item >> 24) & 0xFFFF), t0 = (int)(item & 0xFFFFFF);
    const int seq = jb->seqs[si], W = jb->window;
    const int nq = jb->qsl[seq + 1] - jb->qsl[seq];
    const int k_lo = first_key_tile(jb->seq_lens[seq] - nq + t0, W);  // of the item's first query
    const int nk = jb->seq_lens[seq] - k_lo < BK ? jb->seq_lens[seq] - k_lo : BK;
    if (nk <= 0) return;
    int64_t row_off[BK];
    // a claim of every KV head reads whole rows; a single item its own head's part
    const int whole = jb->unit > 1, bytes = (whole ? jb->KH : 1) * jb->D * 2;
    key_rows(jb, jb->block_tables + (int64_t)seq * jb->bt_stride, whole ? 0 : kh, k_lo, nk, row_off);
    for (int kk = 0; kk < nk; kk++)
        for (int c = 0; c < bytes; c += 64) {
            _mm_prefetch((const char *)(jb->k_cache + row_off[kk]) + c, _MM_HINT_T0);
            _mm_prefetch((const char *)(jb->v_cache + row_off[kk]) + c, _MM_HINT_T1);
        }
}

// One part of the pool job: take items until none are left, with this thread's scratch.
static void attention_part(void *arg, int part, int n_parts) {
    (void)part;
    (void)n_parts;
    job_t *jb = (job_t *)arg;
    static __thread scratch_t sc;  // per thread, allocated once
    if (!sc.qp) {
        sc.qp = aligned_alloc(64, sizeof(uint32_t) * MAX_D / 2 * NR);
        sc.st = aligned_alloc(64, sizeof(float) * BK * NR);
        sc.pp = aligned_alloc(64, sizeof(uint32_t) * BK / 2 * NR);
        sc.vp = aligned_alloc(64, sizeof(uint32_t) * BK / 2 * MAX_D);
        sc.ot = aligned_alloc(64, sizeof(float) * MAX_D * NR);
        sc.zero = aligned_alloc(64, sizeof(uint16_t) * MAX_D);
        if (!(sc.qp && sc.st && sc.pp && sc.vp && sc.ot && sc.zero)) {  // out of memory: report it
            free(sc.qp); free(sc.st); free(sc.pp); free(sc.vp); free(sc.ot); free(sc.zero);
            memset(&sc, 0, sizeof sc);
            __atomic_store_n(&jb->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        memset(sc.zero, 0, sizeof(uint16_t) * MAX_D);
    }
    // Each thread claims its next item before running the current one and asks for that
    // item's first keys: the cache rows are scattered over blocks and rarely cached, and the
    // first tile of an item is otherwise read with nothing to overlap it.
    const int n_claims = jb->n_items / jb->unit;
    int i = __atomic_fetch_add(&jb->next, 1, __ATOMIC_RELAXED);
    while (i < n_claims) {
        const int j = __atomic_fetch_add(&jb->next, 1, __ATOMIC_RELAXED);
        if (j < n_claims) prefetch_first_keys(jb, jb->items[j * jb->unit]);
        const int64_t first = jb->items[i * jb->unit];
        const int seq = jb->seqs[(int)(first >> 40)];
        if (jb->unit == jb->KH && decode_layout(jb->qsl[seq + 1] - jb->qsl[seq], jb->H / jb->KH) &&
            jb->H <= DECODE_MAX_ROWS)
            run_decode(jb, first, &sc, 0, jb->KH);  // the unit's items: every KV head of one token
        else
            for (int u = 0; u < jb->unit; u++) run_item(jb, jb->items[i * jb->unit + u], &sc);
        i = j;
    }
}

static int cmp_cost_desc(const void *a, const void *b) {
    // (item, key count, order): by decreasing key count, then the order the caller gave (which
    // keeps the KV heads of one run of tokens next to each other)
    const int64_t *x = (const int64_t *)a, *y = (const int64_t *)b;
    if (x[1] != y[1]) return (x[1] < y[1]) - (x[1] > y[1]);
    return (x[2] > y[2]) - (x[2] < y[2]);
}

// Returns 0 on success, a negative code for arguments the kernel does not take.
int tessera_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                           const int32_t *qsl, const int32_t *seq_lens, const int32_t *block_tables,
                           int bt_stride, const int32_t *seqs, int n_seqs, int H, int KH, int D, int BS,
                           float scale, int window, uint16_t *out, int n_threads) {
    if (D % 32 != 0 || D > MAX_D) return -1;
    if (KH <= 0 || H % KH != 0 || H / KH > NR) return -2;
    int32_t *all = NULL;  // seqs NULL: every sequence of the step
    if (!seqs) {
        if (!(all = malloc(sizeof(int32_t) * (n_seqs > 0 ? n_seqs : 1)))) return -3;
        for (int i = 0; i < n_seqs; i++) all[i] = i;
        seqs = all;
    }
    int n_items = 0;
    for (int i = 0; i < n_seqs; i++) {
        int nq = qsl[seqs[i] + 1] - qsl[seqs[i]];
        int bq = tile_tokens(nq, H / KH);
        n_items += KH * ((nq + bq - 1) / bq);
    }
    if (n_items == 0) { free(all); return 0; }
    int64_t *pairs = malloc(sizeof(int64_t) * 3 * n_items);
    int64_t *items = malloc(sizeof(int64_t) * n_items);
    if (!pairs || !items) { free(pairs); free(items); free(all); return -3; }
    int n = 0;
    for (int i = 0; i < n_seqs; i++) {
        int seq = seqs[i];
        int nq = qsl[seq + 1] - qsl[seq];
        int first_pos = seq_lens[seq] - nq;
        int bq = tile_tokens(nq, H / KH);
        for (int t0 = 0; t0 < nq; t0 += bq) {
            int keys = first_pos + t0 + bq;
            if (window > 0 && keys > window + bq) keys = window + bq;
            for (int kh = 0; kh < KH; kh++) {
                pairs[3 * n] = ((int64_t)i << 40) | ((int64_t)kh << 24) | t0;
                pairs[3 * n + 1] = keys;
                pairs[3 * n + 2] = n;
                n++;
            }
        }
    }
    qsort(pairs, n, 3 * sizeof(int64_t), cmp_cost_desc);  // longest first: balances the threads
    for (int i = 0; i < n; i++) items[i] = pairs[3 * i];
    free(pairs);
    if (n_threads < 1) n_threads = 1;
    // With many runs, a thread takes all KV heads of a run at once: they share the cache lines
    // of the run's K/V rows (a row holds every KV head), which are then read from memory once.
    const int unit = n / KH >= 4 * n_threads ? KH : 1;
    job_t jb = {q, k_cache, v_cache, qsl, seq_lens, block_tables, seqs, n_seqs, bt_stride, H, KH, D, BS,
                window, scale, out, items, n, unit, 0, 0};
    if (n_threads > n / unit) n_threads = n / unit;
    pool_run(attention_part, &jb, n_threads, n_threads);
    free(items);
    free(all);
    return jb.failed ? -3 : 0;
}

#else

int tessera_attention_bf16(void) { return -100; }

#endif
