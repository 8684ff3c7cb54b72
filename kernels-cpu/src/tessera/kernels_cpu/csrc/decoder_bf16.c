// A stack of Llama-family decoder layers in bf16 with packed weights, in one call per step:
// the same ops, in the same order and with the same roundings, as the per-op path
// (tessera.kernels.reference.llama_layers), without a Python call, a tensor or an allocation
// per op. For each layer:
//   h, residual = rms_norm(x (+ residual)); qkv = h Wqkv (+ b); rotary(q, k); k, v -> cache;
//   a = attention(q, cache); x = a Wo (+ b); h, residual = rms_norm(x + residual);
//   x = silu_and_mul(h Wgate_up (+ b)) Wdown (+ b)
// or, for a mixture-of-experts layer, x = moe(h): router logits in fp32, softmax, top-k, then
// tessera_moe (moe.c) over the packed experts. A weight may be packed segments along permuted
// inputs (GPTQ act-order, EXL2; qmatmul.h): h is gathered and quantized once per projection.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "qmatmul.h"

// a projection: up to 3 weights stacked by output rows (q|k|v of different schemes, or each
// with its own input segments), biases in bf16
typedef struct {
    int n_parts;
    tq_part part[3];
} tq_stack;

// a mixture-of-experts MLP; n_experts 0 for a dense layer
typedef struct {
    int n_experts, top_k, renormalize, inter, gu_qtype, dn_qtype;
    const float *router;       // fp32 [n_experts, hidden]
    const int64_t *gu, *dn;    // per expert: addresses of qs, d, m (moe.c)
} tq_moe;

typedef struct {
    const uint16_t *input_norm, *post_norm;  // bf16 [hidden]
    tq_stack qkv, o, gate_up, down;
    tq_moe moe;
    uint16_t *k_cache, *v_cache;  // [blocks, block size, KV heads, head size]
    int window;                   // sliding window, 0 for none
} tq_layer;

typedef struct {
    int T, hidden, H, KH, D, inter, BS, n_seqs, bt_stride, n_threads;
    float eps, scale;
    const float *cos, *sin;  // [T, D/2]
    const int64_t *slots;    // [T]; negative: not written
    const int32_t *qsl, *seq_lens, *block_tables;
    uint16_t *h, *qkv, *q, *attn, *gu, *act;  // scratch: [T, hidden], [T, (H + 2 KH) D], [T, H D] x2, [T, 2 inter], [T, inter]
    float *moe_probs;                         // MoE scratch: [T, n_experts]
    int64_t *moe_ids;                         // [T, top_k]
    float *moe_w;                             // [T, top_k]
    void *moe_scratch;                        // tessera_moe's, 64-byte aligned
} tq_step;

int tessera_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out,
                          uint16_t *residual_out, int T, int N, float eps, int n_threads);
int tessera_rotary_bf16(uint16_t *x, const float *cos, const float *sin, int T, int heads, int D, int64_t stride,
                        int n_threads);
int tessera_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int T, int N, int n_threads);
int tessera_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *qsl,
                           const int32_t *seq_lens, const int32_t *block_tables, int bt_stride, const int32_t *seqs,
                           int n_seqs, int H, int KH, int D, int BS, float scale, int window, uint16_t *out,
                           int n_threads);

int tessera_moe(const void *x, int x_bf16, int T, int H, int I, int E, int k, const int64_t *ids, const float *w,
                int renormalize, int gu_qtype, const int64_t *gu, int dn_qtype, const int64_t *dn, void *out,
                void *scratch, int n_threads);

static inline float bf16_f32(uint16_t v) {
    union {
        uint32_t u;
        float f;
    } c = {(uint32_t)v << 16};
    return c.f;
}

// Each token's router logits (its own order of sums), softmax, and its top k (ties: the lower
// expert), then the experts: a token's result depends on its row alone.
static int moe_mlp(const tq_moe *m, const tq_step *st, int T, int H, uint16_t *x, int nt) {
    const int E = m->n_experts, k = m->top_k;
    for (int t = 0; t < T; t++) {
        const uint16_t *h = st->h + (int64_t)t * H;
        float *p = st->moe_probs + (int64_t)t * E;
        float top = -INFINITY, sum = 0.0f;
        for (int e = 0; e < E; e++) {
            // 16 partial sums (vectorizable, one fixed order: H is a multiple of 16)
            const float *r = m->router + (int64_t)e * H;
            float part[16] = {0};
            for (int j = 0; j < H; j += 16)
                for (int l = 0; l < 16; l++) part[l] += bf16_f32(h[j + l]) * r[j + l];
            float acc = 0.0f;
            for (int l = 0; l < 16; l++) acc += part[l];
            p[e] = acc;
            if (acc > top) top = acc;
        }
        for (int e = 0; e < E; e++) sum += (p[e] = expf(p[e] - top));
        for (int e = 0; e < E; e++) p[e] /= sum;
        for (int j = 0; j < k; j++) {
            int best = 0;
            for (int e = 1; e < E; e++)
                if (p[e] > p[best]) best = e;
            st->moe_ids[(int64_t)t * k + j] = best;
            st->moe_w[(int64_t)t * k + j] = p[best];
            p[best] = -1.0f;  // taken
        }
    }
    return tessera_moe(st->h, 1, T, H, m->inter, E, k, st->moe_ids, st->moe_w, m->renormalize, m->gu_qtype, m->gu,
                       m->dn_qtype, m->dn, x, st->moe_scratch, nt);
}

static int matmul(const tq_stack *s, const uint16_t *x, int T, int K, uint16_t *out, int n_threads) {
    int ldo = 0;
    for (int i = 0; i < s->n_parts; i++) ldo += s->part[i].N;
    return tessera_q_matmul_parts(s->part, s->n_parts, x, 1, T, K, out, ldo, 1, n_threads);
}

#define TRY(call)               \
    do {                        \
        const int rc_ = (call); \
        if (rc_) return rc_;    \
    } while (0)

// x [T, hidden] in/out (the last layer's MLP output), residual [T, hidden] in/out;
// has_residual 0: the first layer's input is x alone (residual := x).
int tessera_llama_layers_bf16(const tq_layer *layers, int n_layers, const tq_step *st, uint16_t *x,
                              uint16_t *residual, int has_residual) {
    const int T = st->T, E = st->hidden, D = st->D, qw = st->H * D, kw = st->KH * D, row = qw + 2 * kw;
    const int nt = st->n_threads;
    for (int l = 0; l < n_layers; l++) {
        const tq_layer *ly = &layers[l];
        if (l == 0 && !has_residual) {
            memcpy(residual, x, sizeof(uint16_t) * (size_t)T * E);
            TRY(tessera_rms_norm_bf16(x, NULL, ly->input_norm, st->h, NULL, T, E, st->eps, nt));
        } else {
            TRY(tessera_rms_norm_bf16(x, residual, ly->input_norm, st->h, residual, T, E, st->eps, nt));
        }
        TRY(matmul(&ly->qkv, st->h, T, E, st->qkv, nt));
        TRY(tessera_rotary_bf16(st->qkv, st->cos, st->sin, T, st->H, D, row, nt));
        TRY(tessera_rotary_bf16(st->qkv + qw, st->cos, st->sin, T, st->KH, D, row, nt));
        for (int t = 0; t < T; t++) {
            const uint16_t *r = st->qkv + (int64_t)t * row;
            memcpy(st->q + (int64_t)t * qw, r, sizeof(uint16_t) * qw);
            const int64_t slot = st->slots[t];
            if (slot < 0) continue;
            memcpy(ly->k_cache + slot * kw, r + qw, sizeof(uint16_t) * kw);
            memcpy(ly->v_cache + slot * kw, r + qw + kw, sizeof(uint16_t) * kw);
        }
        TRY(tessera_attention_bf16(st->q, ly->k_cache, ly->v_cache, st->qsl, st->seq_lens, st->block_tables,
                                   st->bt_stride, NULL, st->n_seqs, st->H, st->KH, D, st->BS, st->scale, ly->window,
                                   st->attn, nt));
        TRY(matmul(&ly->o, st->attn, T, qw, x, nt));
        TRY(tessera_rms_norm_bf16(x, residual, ly->post_norm, st->h, residual, T, E, st->eps, nt));
        if (ly->moe.n_experts) {
            TRY(moe_mlp(&ly->moe, st, T, E, x, nt));
            continue;
        }
        TRY(matmul(&ly->gate_up, st->h, T, E, st->gu, nt));
        TRY(tessera_silu_and_mul_bf16(st->gu, st->act, T, st->inter, nt));
        TRY(matmul(&ly->down, st->act, T, st->inter, x, nt));
    }
    return 0;
}
