// Matrix products with GGUF weights kept packed: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
//
// At load every scheme is repacked into a form where each weight is d * q + m, with q unsigned
// and (d, m) per sub-block of 32 inputs (16 for Q6_K), and q kept in as many bits as the file's:
//   4 bits (Q4_0, Q4_1, Q4_K): q in 0..15;
//   5 bits (Q5_0, Q5_1, Q5_K): q in 0..31;
//   6 bits (Q6_K): q in 0..63, the file's quants as they are;
//   8 bits (Q8_0): q in 0..255, the file's signed quants plus 128.
// m is stored (Q4_1, Q5_1, Q4_K, Q5_K) or is a fixed multiple of d (Q4_0: -8 d, Q5_0: -16 d,
// Q8_0: -128 d, Q6_K: -32 d). d and m are fp16: the files' own values for the 32-blocks, and
// d * scale, -dmin * min rounded to fp16 for the K-quants' sub-blocks (a relative 2^-12, far
// below the 4-6-bit steps).
//
// Layout: 16 output rows side by side; row group g's 32-block b is bits * 64 bytes. Think of the
// 8-bit form first: 8 "steps" of 64 bytes, step s holding for each of the 16 rows 4 bytes (one
// 32-bit lane per row), quants 4s..4s+3 of the block; one 64-byte load is one step for all 16
// rows. The other forms store that in pieces:
//   bytes [0, 256): the low 4 bits, step s's in the low nibbles of 64-byte vector s and step
//   4 + s's in its high nibbles (s < 4), so vector s holds quants 4s.. and 16 + 4s..;
//   bytes [256, 256 + 64 (bits - 4)): for 5 and 6 bits, per step s of the 8-bit form and bit
//   4 + p above the nibbles (p < bits - 4), one 64-bit mask (at 256 + 8 (s (bits - 4) + p)):
//   its bit i is that bit of step s's byte lane i. The kernels OR it in after unpacking the
//   nibbles (a masked byte add), so they feed vpdpbusd the very quants of the 8-bit form, and
//   read a group block's bytes in order: 4, 5, 6 or 8 bits a weight streamed, not 8.
//
// bf16 inputs are quantized per token and 32-block to int8 (scale max|x| / 127, round to
// nearest even, as llama.cpp does for its q8 activations) and multiplied with vpdpbusd
// (unsigned weight byte x signed input byte, 4 products per lane): each packed byte is read
// once per 8 tokens, and each instruction does 64 multiply-adds. fp32 inputs take an FMA path
// over exact weights instead.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "qmatmul.h"

#define QMT 8   // tokens per pass over a row group's packed bytes
#define QMT_F32 4  // the same for fp32 inputs: 4 accumulator chains per token at every tile width
#define QTB 64  // tokens per block of the loop over row groups (many-token products)

typedef struct {
    int bits;        // 4, 5, 6 or 8
    int spb;         // sub-blocks per 32-block (1, or 2 for Q6_K)
    int has_m;       // m stored, else m = mfac * d
    float mfac;
    int block;       // inputs per GGUF block
    int block_bytes; // bytes per GGUF block
} qform;

static int form_of(int qtype, qform *f) {
    switch (qtype) {
        case 2: *f = (qform){4, 1, 0, -8.0f, 32, 18}; return 0;      // Q4_0
        case 3: *f = (qform){4, 1, 1, 0.0f, 32, 20}; return 0;       // Q4_1
        case 6: *f = (qform){5, 1, 0, -16.0f, 32, 22}; return 0;     // Q5_0
        case 7: *f = (qform){5, 1, 1, 0.0f, 32, 24}; return 0;       // Q5_1
        case 8: *f = (qform){8, 1, 0, -128.0f, 32, 34}; return 0;    // Q8_0
        case 12: *f = (qform){4, 1, 1, 0.0f, 256, 144}; return 0;    // Q4_K
        case 13: *f = (qform){5, 1, 1, 0.0f, 256, 176}; return 0;    // Q5_K
        case 14: *f = (qform){6, 2, 0, -32.0f, 256, 210}; return 0;  // Q6_K
        default: return -1;
    }
}

// bytes of quants per row group and 32-block
static inline int group_block_bytes(const qform *f) { return f->bits * 64; }

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <stdlib.h>

#include "simd.h"

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7F800000u) == 0x7F800000u) return (uint16_t)((bits >> 16) | ((bits & 0xFFFF) ? 0x40 : 0));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

// ggml's get_scale_min_k4: sub-block j's 6-bit scale and min from the 12 packed bytes
static inline void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// 32-block `b` (of its GGUF block `blk`) as unsigned quants q[32] and, per sub-block h, fp16
// d[h] (and m[h] where stored). Returns -1 where a scale does not fit fp16.
static int decode_block(int qtype, const uint8_t *blk, int b, uint8_t *q, uint16_t *d, uint16_t *m) {
    switch (qtype) {
        case 2:  // Q4_0: d, 16 bytes (lo nibbles 0..15, hi 16..31)
        case 3:  // Q4_1: d, m, 16 bytes
        {
            const uint8_t *qs = blk + (qtype == 3 ? 4 : 2);
            for (int i = 0; i < 16; i++) {
                q[i] = qs[i] & 0x0F;
                q[i + 16] = qs[i] >> 4;
            }
            d[0] = rd16(blk);
            if (qtype == 3) m[0] = rd16(blk + 2);
            return 0;
        }
        case 6:  // Q5_0: d, qh (32 bits), 16 bytes
        case 7:  // Q5_1: d, m, qh, 16 bytes
        {
            const int off = qtype == 7 ? 4 : 2;
            uint32_t qh;
            memcpy(&qh, blk + off, 4);
            const uint8_t *qs = blk + off + 4;
            for (int i = 0; i < 16; i++) {
                q[i] = (qs[i] & 0x0F) | (((qh >> i) & 1) << 4);
                q[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
            }
            d[0] = rd16(blk);
            if (qtype == 7) m[0] = rd16(blk + 2);
            return 0;
        }
        case 8:  // Q8_0: d, 32 signed bytes
            for (int i = 0; i < 32; i++) q[i] = (uint8_t)((int)(int8_t)blk[2 + i] + 128);
            d[0] = rd16(blk);
            return 0;
        case 12:  // Q4_K: d, dmin, 12 scale bytes, 128 bytes (32-byte runs: lo nibbles, then hi)
        case 13:  // Q5_K: the same, then qh[32], then the 128 bytes
        {
            const float dd = half_to_float(rd16(blk)), dmin = half_to_float(rd16(blk + 2));
            int sc, mn;
            scale_min_k4(b, blk + 4, &sc, &mn);
            const uint8_t *qs = blk + (qtype == 12 ? 16 : 48) + 32 * (b / 2);
            const int shift = 4 * (b % 2);
            for (int i = 0; i < 32; i++) {
                q[i] = (qs[i] >> shift) & 0x0F;
                if (qtype == 13) q[i] |= ((blk[16 + i] >> b) & 1) << 4;
            }
            const float dv = dd * (float)sc, mv = -dmin * (float)mn;
            d[0] = float_to_half(dv);
            m[0] = float_to_half(mv);
            if (!isfinite(half_to_float(d[0])) || !isfinite(half_to_float(m[0]))) return -1;
            return 0;
        }
        case 14:  // Q6_K: ql[128], qh[64], 16 int8 scales, d; halves of 128 in 4 planes of 32
        {
            const int h = b / 4, k = b % 4;
            const uint8_t *ql = blk + h * 64 + (k % 2) * 32, *qh = blk + 128 + h * 32;
            for (int i = 0; i < 32; i++) {
                const int lo = k < 2 ? (ql[i] & 0x0F) : (ql[i] >> 4);
                q[i] = (uint8_t)(lo | (((qh[i] >> (2 * k)) & 3) << 4));
            }
            const float dd = half_to_float(rd16(blk + 208));
            for (int s = 0; s < 2; s++) {
                d[s] = float_to_half(dd * (float)(int8_t)blk[192 + 2 * b + s]);
                if (!isfinite(half_to_float(d[s]))) return -1;
            }
            return 0;
        }
        default:
            return -1;
    }
}

// Repack W [N, K] from GGUF blocks into qs [N/16][K/32][bits * 64 bytes] (the layout above) and
// d, m [N/16][K/32][sub-blocks][16] fp16 (m only where stored). Returns 0; -1 for a type or
// shape it does not take; -2 where a K-quant scale overflows fp16.
int tessera_q_repack(int qtype, const uint8_t *src, int N, int K, uint8_t *qs, uint16_t *d, uint16_t *m) {
    qform f;
    if (form_of(qtype, &f) || N % 16 || K % f.block) return -1;
    const int nb = K / 32, gbb = group_block_bytes(&f), planes = f.bits == 8 ? 0 : f.bits - 4;
    const int64_t row_bytes = (int64_t)(K / f.block) * f.block_bytes;
    if (planes) memset(qs, 0, (size_t)(N / 16) * nb * gbb);  // the rows' mask bits are ORed in
    for (int n = 0; n < N; n++) {
        const int g = n / 16, r = n % 16;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = src + n * row_bytes + (int64_t)(b * 32 / f.block) * f.block_bytes;
            uint8_t q[32];
            uint16_t dh[2] = {0, 0}, mh[2] = {0, 0};
            if (decode_block(qtype, blk, b % (f.block / 32), q, dh, mh)) return -2;
            const int64_t gb = (int64_t)g * nb + b;
            uint8_t *dst = qs + gb * gbb;
            if (f.bits == 8) {
                for (int s = 0; s < 8; s++)
                    for (int j = 0; j < 4; j++) dst[(s * 16 + r) * 4 + j] = q[4 * s + j];
            } else {
                for (int s = 0; s < 4; s++)
                    for (int j = 0; j < 4; j++)
                        dst[(s * 16 + r) * 4 + j] = (uint8_t)((q[4 * s + j] & 0x0F) | (q[16 + 4 * s + j] << 4));
                // step s's byte lane r * 4 + j holds quant 4s + j: bit r * 4 + j of its masks,
                // little-endian, is bit (r % 2) * 4 + j of mask byte r / 2
                for (int s = 0; s < 8; s++)
                    for (int p = 0; p < planes; p++)
                        for (int j = 0; j < 4; j++)
                            if ((q[4 * s + j] >> (4 + p)) & 1)
                                dst[256 + (s * planes + p) * 8 + r / 2] |= (uint8_t)(1 << ((r % 2) * 4 + j));
            }
            for (int h = 0; h < f.spb; h++) {
                d[(gb * f.spb + h) * 16 + r] = dh[h];
                if (f.has_m) m[(gb * f.spb + h) * 16 + r] = mh[h];
            }
        }
    }
    return 0;
}

// 5 and 6 bits: the quants of the 8-bit form's step s8 (0..7) from their low 4 bits `nib` and
// the group block q's mask planes (bits 4, 5: each absent from nib, so an add is an OR)
static inline __m512i high_bits(__m512i nib, const uint8_t *q, int s8, const int BITS) {
    if (BITS != 5 && BITS != 6) return nib;
    const uint8_t *mk = q + 256 + s8 * (BITS - 4) * 8;
    uint64_t k;
    memcpy(&k, mk, 8);
    nib = _mm512_mask_add_epi8(nib, _cvtu64_mask64(k), nib, _mm512_set1_epi8(0x10));
    if (BITS == 6) {
        memcpy(&k, mk + 8, 8);
        nib = _mm512_mask_add_epi8(nib, _cvtu64_mask64(k), nib, _mm512_set1_epi8(0x20));
    }
    return nib;
}

// step s8 (0..7) of the 8-bit form of group block q, whatever its form
static inline __m512i step8(const uint8_t *q, int s8, const int BITS) {
    if (BITS == 8) return _mm512_loadu_si512(q + s8 * 64);
    const __m512i v = _mm512_loadu_si512(q + (s8 % 4) * 64);
    const __m512i nib = _mm512_and_si512(s8 < 4 ? v : _mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
    return high_bits(nib, q, s8, BITS);
}

// one segment of a product: a packed weight over 32-blocks [b0, b0 + nb) of the inputs
typedef struct {
    qform f;
    const uint8_t *qs;
    const uint16_t *d, *m;
    int b0, nb;
} qseg;

// one product's arguments and its quantized inputs
typedef struct {
    const qseg *seg;
    int n_seg;
    const int32_t *xq;   // int8 path: [M][K/32][8] groups of 4 int8 inputs
    const float *xs;     // int8 path: [M][K/32] scales
    const float *xsum;   // [M][K/32][2]: sums over each half block (int8 path: of the dequantized inputs)
    const float *xf;     // fp32 path: inputs [M][K], else NULL
    const void *bias;    // [N], the output's dtype, or NULL
    void *out;
    int64_t ldo;  // output row stride (elements)
    int M, K, N, out_bf16;
} qmm_t;

static inline void store_rows(const qmm_t *a, int g, int t0, int MT, __m512 *total) {
    __m512 bv = _mm512_setzero_ps();
    if (a->bias) bv = a->out_bf16 ? load_bf16((const uint16_t *)a->bias + g * 16) : _mm512_loadu_ps((const float *)a->bias + g * 16);
    for (int t = 0; t < MT; t++) {
        const int64_t off = (int64_t)(t0 + t) * a->ldo + g * 16;
        const __m512 v = _mm512_add_ps(total[t], bv);
        if (a->out_bf16)
            store_bf16((uint16_t *)a->out + off, v);
        else
            _mm512_storeu_ps((float *)a->out + off, v);
    }
}

// acc + the dot products of w's unsigned bytes with the 4 signed bytes at x, broadcast: the
// broadcast folded into vpdpbusd's memory operand (compilers emit a separate vpbroadcastd)
static inline __m512i dpbusd_x(__m512i acc, __m512i w, const int32_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
}

static inline __m512 scale_m(const qseg *s, int64_t i, __m512 dv) {
    return s->f.has_m ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s->m + i * 16)))
                      : _mm512_mul_ps(dv, _mm512_set1_ps(s->f.mfac));
}

// int8 inputs: rows of group g for tokens [t0, t0 + MT) over segment s, added to io (a token's
// sums continue from segment to segment in their order); BITS and SPB are constants
static inline __attribute__((always_inline)) void qmm_group_i8(const qmm_t *a, const qseg *sg, int g, int t0,
                                                               const int MT, const int BITS, const int SPB,
                                                               __m512 *io) {
    const int nb = a->K / 32, gbb = BITS * 64;
    // few tokens: two accumulator chains per token (integer sums: exact in any order, so a
    // token's result does not depend on the tile width)
    const int split = MT <= 4;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 total[QMT];
    for (int t = 0; t < MT; t++) total[t] = io[t];
    for (int b = 0; b < sg->nb; b++) {
        const int64_t gb = (int64_t)g * sg->nb + b, xb = sg->b0 + b;  // weight block, input block
        const uint8_t *q = sg->qs + gb * gbb;
        for (int h = 0; h < SPB; h++) {
            __m512i acc[QMT], acc2[QMT];
            for (int t = 0; t < MT; t++) acc[t] = acc2[t] = _mm512_setzero_si512();
            if (BITS != 8) {
                // vector s: quants 4s.. (low nibbles) and 16 + 4s.. (high); with two sub-blocks
                // (Q6_K) sub-block h is the low nibbles (inputs 0..15) or the high ones
                for (int s = 0; s < 4; s++) {
                    const __m512i v = _mm512_loadu_si512(q + s * 64);
                    __m512i lo = _mm512_setzero_si512(), hi = lo;
                    if (SPB == 1 || h == 0) lo = high_bits(_mm512_and_si512(v, nib), q, s, BITS);
                    if (SPB == 1 || h == 1)
                        hi = high_bits(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib), q, 4 + s, BITS);
                    for (int t = 0; t < MT; t++) {
                        const int32_t *x = a->xq + ((int64_t)(t0 + t) * nb + xb) * 8;
                        if (SPB == 2) {
                            __m512i *c = split && (s & 1) ? &acc2[t] : &acc[t];
                            *c = dpbusd_x(*c, h ? hi : lo, &x[4 * h + s]);
                            continue;
                        }
                        acc[t] = dpbusd_x(acc[t], lo, &x[s]);
                        if (split)
                            acc2[t] = dpbusd_x(acc2[t], hi, &x[4 + s]);
                        else
                            acc[t] = dpbusd_x(acc[t], hi, &x[4 + s]);
                    }
                }
            } else {
                const int steps = 8 / SPB;
                for (int s = h * steps; s < (h + 1) * steps; s++) {
                    const __m512i v = _mm512_loadu_si512(q + s * 64);
                    for (int t = 0; t < MT; t++) {
                        const int32_t *x = a->xq + ((int64_t)(t0 + t) * nb + xb) * 8;
                        if (split && (s & 1))
                            acc2[t] = dpbusd_x(acc2[t], v, &x[s]);
                        else
                            acc[t] = dpbusd_x(acc[t], v, &x[s]);
                    }
                }
            }
            const int64_t si = gb * SPB + h;
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg->d + si * 16)));
            const __m512 mv = scale_m(sg, si, dv);
            for (int t = 0; t < MT; t++) {
                const int64_t tb = (int64_t)(t0 + t) * nb + xb;
                const float xsum = SPB == 2 ? a->xsum[tb * 2 + h] : a->xsum[tb * 2] + a->xsum[tb * 2 + 1];
                const __m512i dot = split ? _mm512_add_epi32(acc[t], acc2[t]) : acc[t];
                total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, _mm512_set1_ps(a->xs[tb])), total[t]);
                total[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum), total[t]);
            }
        }
    }
    for (int t = 0; t < MT; t++) io[t] = total[t];
}

// fp32 inputs: sum q x accumulated with FMAs (q converted exactly), then d * that + m * sum x,
// so the result matches the dequantized weight times x up to summation order. The 5- and 6-bit
// forms run as the 8-bit one, over its steps rebuilt (the same sums in the same order).
static inline __attribute__((always_inline)) void qmm_group_f32(const qmm_t *a, const qseg *sg, int g, int t0,
                                                                const int MT, const int BITS, const int SPB,
                                                                __m512 *io) {
    const int nb = a->K / 32, gbb = BITS * 64, two = BITS == 4;  // two: quants per byte
    const __m512i mask = _mm512_set1_epi32(two ? 0x0F : 0xFF);
    __m512 total[QMT_F32];
    for (int t = 0; t < MT; t++) total[t] = io[t];
    for (int b = 0; b < sg->nb; b++) {
        const int64_t gb = (int64_t)g * sg->nb + b, xb = sg->b0 + b;
        const uint8_t *q = sg->qs + gb * gbb;
        for (int h = 0; h < SPB; h++) {
            // 4 accumulator chains per token (so FMA latency does not bound a decode), at every
            // tile width: a token's sums go in the same order whatever the tokens beside it
            const int chains = 4;
            __m512 acc[4][QMT_F32];
            for (int c = 0; c < chains; c++)
                for (int t = 0; t < MT; t++) acc[c][t] = _mm512_setzero_ps();
            const int s0 = two ? 0 : h * (8 / SPB), s1 = two ? 4 : (h + 1) * (8 / SPB);
            for (int s = s0; s < s1; s++) {
                const __m512i v = two ? _mm512_loadu_si512(q + s * 64) : step8(q, s, BITS);
                for (int j = 0; j < 4; j++) {
                    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j), mask));
                    __m512 w1 = w0;
                    if (two) w1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * j + 4), mask));
                    for (int t = 0; t < MT; t++) {
                        const float *x = a->xf + (int64_t)(t0 + t) * a->K + xb * 32;
                        __m512 *c = &acc[j % chains][t];
                        *c = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[4 * s + j]), *c);
                        if (two) *c = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[16 + 4 * s + j]), *c);
                    }
                }
            }
            for (int c = 1; c < chains; c++)
                for (int t = 0; t < MT; t++) acc[0][t] = _mm512_add_ps(acc[0][t], acc[c][t]);
            const int64_t si = gb * SPB + h;
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg->d + si * 16)));
            const __m512 mv = scale_m(sg, si, dv);
            for (int t = 0; t < MT; t++) {
                const int64_t tb = (int64_t)(t0 + t) * nb + xb;
                const float xsum = SPB == 2 ? a->xsum[tb * 2 + h] : a->xsum[tb * 2] + a->xsum[tb * 2 + 1];
                total[t] = _mm512_fmadd_ps(dv, acc[0][t], total[t]);
                total[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum), total[t]);
            }
        }
    }
    for (int t = 0; t < MT; t++) io[t] = total[t];
}

#define QMM_CASE(fn, n, B, S) \
    case n: fn(a, sg, g, t0, n, B, S, total); break;
#define QMM_TILE(fn, B, S)                                                                                         \
    switch (mt) {                                                                                                  \
        QMM_CASE(fn, 1, B, S) QMM_CASE(fn, 2, B, S) QMM_CASE(fn, 3, B, S) QMM_CASE(fn, 4, B, S)                   \
        QMM_CASE(fn, 5, B, S) QMM_CASE(fn, 6, B, S) QMM_CASE(fn, 7, B, S) QMM_CASE(fn, 8, B, S) default : break; \
    }
#define QMM_TILE4(fn, B, S)                                                                   \
    switch (mt) {                                                                             \
        QMM_CASE(fn, 1, B, S) QMM_CASE(fn, 2, B, S) QMM_CASE(fn, 3, B, S) QMM_CASE(fn, 4, B, S) \
        default : break;                                                                      \
    }

// rows of group g for tokens [t0, t0 + mt): the segments in order into one fp32 sum per output
static inline void qmm_tile(const qmm_t *a, int g, int t0, int mt) {
    __m512 total[QMT];
    for (int t = 0; t < mt; t++) total[t] = _mm512_setzero_ps();
    for (int i = 0; i < a->n_seg; i++) {
        const qseg *sg = &a->seg[i];
        // the forms form_of makes: 4, 5 and 8 bits with one sub-block a 32-block, 6 with two
        const int form = (sg->f.bits == 4 ? 0 : sg->f.bits == 5 ? 1 : sg->f.bits == 6 ? 2 : 3) + (a->xf ? 4 : 0);
        switch (form) {
            case 0: QMM_TILE(qmm_group_i8, 4, 1) break;
            case 1: QMM_TILE(qmm_group_i8, 5, 1) break;
            case 2: QMM_TILE(qmm_group_i8, 6, 2) break;
            case 3: QMM_TILE(qmm_group_i8, 8, 1) break;
            case 4: QMM_TILE4(qmm_group_f32, 4, 1) break;
            case 5: QMM_TILE4(qmm_group_f32, 5, 1) break;
            case 6: QMM_TILE4(qmm_group_f32, 6, 2) break;
            default: QMM_TILE4(qmm_group_f32, 8, 1) break;
        }
    }
    store_rows(a, g, t0, mt, total);
}

// row groups [g0, g1) of one product, all its tokens
static void qmm_rows(const qmm_t *a, int g0, int g1) {
    const int tw = a->xf ? QMT_F32 : QMT;
    for (int tb = 0; tb < a->M; tb += QTB) {  // a block of tokens stays in cache over the row groups
        const int te = tb + QTB < a->M ? tb + QTB : a->M;
        for (int g = g0; g < g1; g++)
            for (int t0 = tb; t0 < te; t0 += tw) qmm_tile(a, g, t0, te - t0 < tw ? te - t0 : tw);
    }
}

// several products side by side (a row stack's parts): their row groups shared out among the
// threads as one range, so the parts cost one wake-up of the threads, not one each
#define MAX_PARTS 8
typedef struct {
    qmm_t p[MAX_PARTS];
    int start[MAX_PARTS + 1];  // first row group of each part, then the total
    int n;
} qmm_stack_t;

static void qmm_stack_part(void *arg, int part, int n_parts) {
    const qmm_stack_t *s = (const qmm_stack_t *)arg;
    const int groups = s->start[s->n];
    const int g0 = (int)((int64_t)groups * part / n_parts), g1 = (int)((int64_t)groups * (part + 1) / n_parts);
    for (int i = 0; i < s->n; i++) {
        const int lo = g0 > s->start[i] ? g0 : s->start[i], hi = g1 < s->start[i + 1] ? g1 : s->start[i + 1];
        if (lo < hi) qmm_rows(&s->p[i], lo - s->start[i], hi - s->start[i]);
    }
}

// x's inputs in product order, per token and 32-block: int8 quants and scales (bf16 x), the
// gathered inputs (fp32 x under a permutation), and half-block sums
typedef struct {
    int8_t *xq;
    float *xs, *xsum, *xg;
} qinputs;

typedef struct {
    const void *x;
    int x_bf16, K;
    const int32_t *perm;
    qinputs in;
} quant_t;

// token t's 32 inputs from product input k on, as fp32 (under a permutation: gathered)
static inline void load32(const quant_t *a, int64_t t, int k, __m512 *v0, __m512 *v1) {
    if (a->x_bf16) {
        const uint16_t *row = (const uint16_t *)a->x + t * a->K;
        if (a->perm) {
            uint16_t g[32];
            for (int i = 0; i < 32; i++) g[i] = row[a->perm[k + i]];
            *v0 = load_bf16(g);
            *v1 = load_bf16(g + 16);
        } else {
            *v0 = load_bf16(row + k);
            *v1 = load_bf16(row + k + 16);
        }
        return;
    }
    const float *row = (const float *)a->x + t * a->K;
    if (a->perm) {
        float *g = a->in.xg + t * a->K + k;
        for (int i = 0; i < 32; i++) g[i] = row[a->perm[k + i]];
        row = a->in.xg + t * a->K;
    }
    *v0 = _mm512_loadu_ps(row + k);
    *v1 = _mm512_loadu_ps(row + k + 16);
}

static void quantize_rows(void *arg, int lo, int hi) {
    const quant_t *a = (const quant_t *)arg;
    const qinputs *o = &a->in;
    const int nb = a->K / 32;
    for (int t = lo; t < hi; t++) {
        for (int b = 0; b < nb; b++) {
            const int64_t tb = (int64_t)t * nb + b;
            __m512 v0, v1;
            load32(a, t, b * 32, &v0, &v1);
            if (!a->x_bf16) {
                o->xsum[tb * 2] = _mm512_reduce_add_ps(v0);
                o->xsum[tb * 2 + 1] = _mm512_reduce_add_ps(v1);
                continue;
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float sx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(o->xq + tb * 32), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(o->xq + tb * 32 + 16), _mm512_cvtsepi32_epi8(q1));
            o->xs[tb] = sx;
            o->xsum[tb * 2] = sx * (float)_mm512_reduce_add_epi32(q0);
            o->xsum[tb * 2 + 1] = sx * (float)_mm512_reduce_add_epi32(q1);
        }
    }
}

static void free_inputs(qinputs *in) {
    free(in->xq);
    free(in->xs);
    free(in->xsum);
    free(in->xg);
}

// the buffers of M tokens' K inputs (gathered fp32 ones where `gather`): 0, or -3 without memory
static int alloc_inputs(qinputs *in, int x_bf16, int gather, int M, int K) {
    const int nb = K / 32;
    *in = (qinputs){0};
    in->xsum = malloc(sizeof(float) * (size_t)M * nb * 2);
    if (x_bf16) {
        in->xq = malloc((size_t)M * K);
        in->xs = malloc(sizeof(float) * (size_t)M * nb);
    } else if (gather) {
        in->xg = malloc(sizeof(float) * (size_t)M * K);
    }
    if (!in->xsum || (x_bf16 ? !in->xq || !in->xs : gather && !in->xg)) {
        free_inputs(in);
        return -3;
    }
    return 0;
}

// a part's segments as the kernel's: -1 where they do not cover [0, K) in whole 32-blocks, or
// name a scheme it does not take
static int segments_of(const tq_part *p, int K, qseg *out) {
    int k = 0;
    for (int i = 0; i < p->n_segs; i++) {
        const tq_seg *s = &p->segs[i];
        qform f;
        if (form_of(s->qtype, &f) || s->k0 != k || s->k1 <= s->k0 || s->k0 % 32 || (s->k1 - s->k0) % 32) return -1;
        out[i] = (qseg){f, s->qs, s->d, s->m, s->k0 / 32, (s->k1 - s->k0) / 32};
        k = s->k1;
    }
    return k == K ? 0 : -1;
}

#define MAX_SEGS 64

int tessera_q_matmul_parts(const tq_part *parts, int n_parts, const void *x, int x_bf16, int M, int K, void *out,
                           int64_t ldo, int out_bf16, int n_threads) {
    if (n_parts <= 0 || n_parts > MAX_PARTS || M <= 0 || K % 32) return -1;
    qmm_stack_t st;
    qseg segs[MAX_PARTS][MAX_SEGS];
    st.n = n_parts;
    st.start[0] = 0;
    for (int i = 0; i < n_parts; i++) {
        const tq_part *p = &parts[i];
        if (p->N <= 0 || p->N % 16 || p->n_segs <= 0 || p->n_segs > MAX_SEGS || segments_of(p, K, segs[i]))
            return -1;
        st.start[i + 1] = st.start[i] + p->N / 16;
    }
    if (ldo < (int64_t)st.start[n_parts] * 16) return -1;
    // x gathered and quantized once per run of parts with one permutation (q|k|v, gate|up)
    qinputs in[MAX_PARTS];
    int n_in = 0, rc = 0;
    const size_t es = out_bf16 ? 2 : 4;
    for (int i = 0; i < n_parts; i++) {
        const tq_part *p = &parts[i];
        if (i == 0 || p->perm != parts[i - 1].perm) {
            if (alloc_inputs(&in[n_in], x_bf16, p->perm != NULL, M, K)) {
                rc = -3;
                break;
            }
            quant_t qa = {x, x_bf16, K, p->perm, in[n_in]};
            parallel_rows(quantize_rows, &qa, M, M >= 64 ? n_threads : 1);
            n_in++;
        }
        const qinputs *q = &in[n_in - 1];
        const float *xf = x_bf16 ? NULL : p->perm ? q->xg : (const float *)x;
        st.p[i] = (qmm_t){segs[i], p->n_segs, (const int32_t *)q->xq, q->xs, q->xsum, xf, p->bias,
                          (char *)out + (int64_t)st.start[i] * 16 * es, ldo, M, K, p->N, out_bf16};
    }
    if (!rc) {
        const int groups = st.start[n_parts];
        if ((int64_t)groups * 16 * M * K < (1 << 16)) n_threads = 1;  // too small to share
        if (n_threads > groups) n_threads = groups;
        if (n_threads < 1) n_threads = 1;
        pool_run(qmm_stack_part, &st, n_threads, n_threads);
    }
    for (int i = 0; i < n_in; i++) free_inputs(&in[i]);
    return rc;
}

// out [M, N] (fp32, or bf16 when out_bf16; rows ldo elements apart) = x [M, K] times the
// repacked W [N, K] transposed, plus bias [N] (the output's dtype; NULL for none).
// bf16 x: int8 products; fp32 x: FMAs.
int tessera_q_matmul_ld(int qtype, const void *x, int x_bf16, int M, int K, int N, const uint8_t *qs,
                        const uint16_t *d, const uint16_t *m, const void *bias, void *out, int64_t ldo,
                        int out_bf16, int n_threads) {
    qform f;
    if (form_of(qtype, &f) || N % 16 || K % 32 || M <= 0 || ldo < N) return -1;
    const tq_seg seg = {qtype, 0, K, qs, d, m};
    const tq_part part = {N, 1, &seg, NULL, bias};
    return tessera_q_matmul_parts(&part, 1, x, x_bf16, M, K, out, ldo, out_bf16, n_threads);
}

int tessera_q_matmul(int qtype, const void *x, int x_bf16, int M, int K, int N, const uint8_t *qs,
                     const uint16_t *d, const uint16_t *m, const void *bias, void *out, int out_bf16,
                     int n_threads) {
    return tessera_q_matmul_ld(qtype, x, x_bf16, M, K, N, qs, d, m, bias, out, N, out_bf16, n_threads);
}

// 16 rows' values of input i of 32-block b in row group g, as fp32
static inline __m512 dequant16(const qform *f, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t gb, int i) {
    const uint8_t *q = qs + gb * group_block_bytes(f);
    const __m512i v = step8(q, i / 4, f->bits);
    const __m512 qv = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * (i % 4)), _mm512_set1_epi32(0xFF)));
    const int64_t si = gb * f->spb + (f->spb == 2 ? i / 16 : 0);
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + si * 16)));
    const __m512 mv = f->has_m ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + si * 16)))
                               : _mm512_mul_ps(dv, _mm512_set1_ps(f->mfac));
    return _mm512_fmadd_ps(dv, qv, mv);
}

typedef struct {
    qform f;
    const uint8_t *qs;
    const uint16_t *d, *m;
    void *out;
    int N, K, out_bf16;
} deq_t;

static void deq_part(void *arg, int part, int n_parts) {
    const deq_t *a = (const deq_t *)arg;
    const int groups = a->N / 16, nb = a->K / 32;
    const int g0 = (int)((int64_t)groups * part / n_parts), g1 = (int)((int64_t)groups * (part + 1) / n_parts);
    for (int g = g0; g < g1; g++) {
        for (int b = 0; b < nb; b++) {
            for (int i = 0; i < 32; i++) {
                const __m512 w = dequant16(&a->f, a->qs, a->d, a->m, (int64_t)g * nb + b, i);
                const int64_t off = (int64_t)(b * 32 + i) * a->N + g * 16;
                if (a->out_bf16)
                    store_bf16((uint16_t *)a->out + off, w);
                else
                    _mm512_storeu_ps((float *)a->out + off, w);
            }
        }
    }
}

// W transposed, dequantized: out [K, N] (fp32, or bf16 when out_bf16), for torch's GEMM.
int tessera_q_dequantize_t(int qtype, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N, int K,
                           void *out, int out_bf16, int n_threads) {
    qform f;
    if (form_of(qtype, &f) || N % 16 || K % 32) return -1;
    deq_t a = {f, qs, d, m, out, N, K, out_bf16};
    const int groups = N / 16;
    if (n_threads > groups) n_threads = groups;
    if (n_threads < 1) n_threads = 1;
    pool_run(deq_part, &a, n_threads, n_threads);
    return 0;
}

// Rows `ids` of W, dequantized (embedding lookups from a tied, packed embedding matrix).
int tessera_q_gather_rows(int qtype, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N, int K,
                          const int64_t *ids, int n_ids, void *out, int out_bf16) {
    qform f;
    if (form_of(qtype, &f) || N % 16 || K % 32) return -1;
    const int nb = K / 32;
    for (int t = 0; t < n_ids; t++) {
        const int64_t n = ids[t];
        if (n < 0 || n >= N) return -2;
        const int g = (int)(n / 16), r = (int)(n % 16);
        for (int b = 0; b < nb; b++) {
            float w[16];
            for (int i = 0; i < 32; i++) {
                _mm512_storeu_ps(w, dequant16(&f, qs, d, m, (int64_t)g * nb + b, i));
                const int64_t off = (int64_t)t * K + b * 32 + i;
                if (out_bf16)
                    ((uint16_t *)out)[off] = float_to_bf16(w[r]);
                else
                    ((float *)out)[off] = w[r];
            }
        }
    }
    return 0;
}

#else
int tessera_q_repack(void) { return -100; }
int tessera_q_matmul(void) { return -100; }
int tessera_q_matmul_ld(void) { return -100; }
int tessera_q_matmul_parts(const tq_part *parts, int n_parts, const void *x, int x_bf16, int M, int K, void *out,
                           int64_t ldo, int out_bf16, int n_threads) {
    return -100;
}
int tessera_q_gather_rows(void) { return -100; }
int tessera_q_dequantize_t(void) { return -100; }
#endif
