// The packed matmul's parts (qmatmul.c), shared with the fused decoder (decoder_bf16.c).
#pragma once
#include <stdint.h>

// inputs [k0, k1) of a weight's product order (multiples of 32), packed in one scheme
typedef struct {
    int qtype, k0, k1;
    const uint8_t *qs;
    const uint16_t *d, *m;
} tq_seg;

// a weight [N, K] whose product with x is x[:, perm] times its segments, summed in their order
// in fp32, plus bias: a GGUF weight is one segment without perm; GPTQ act-order and EXL2 weights
// (tessera.kernels.InputSegments) are several
typedef struct {
    int N, n_segs;
    const tq_seg *segs;
    const int32_t *perm;  // [K]: product input j is x[:, perm[j]]; NULL: the identity
    const void *bias;     // [N] in the output's dtype, or NULL
} tq_part;

// out [M, sum of N] (rows ldo elements apart) = the parts' products side by side; x [M, K] is
// gathered and quantized once for consecutive parts with the same perm pointer
int tessera_q_matmul_parts(const tq_part *parts, int n_parts, const void *x, int x_bf16, int M, int K, void *out,
                           int64_t ldo, int out_bf16, int n_threads);
