// Few-token quantized GEMV over the bit planes of gguf_layout.py, with int8 dot products.
//
// The weights are read in the layout the Triton kernels read (lo: the low 4 bits of q, word w of a
// row holding inputs 8w..8w+7, input 8w+i in bits 4i..4i+3; hi: the bits above 4, HI bits per
// input; d: fp16 per GROUP inputs; m: fp16 per 32 inputs), so nothing is repacked twice. The
// activations are quantized first (q8x2_quantize, once per linear call, shared by every part of
// a row stack), per token and per 32 inputs, to two int8 levels:
//     x ~= s * (a + b / 254),  s = max|x| / 127,  a = rint(x / s),  b = rint(254 (x / s - a))
// so |x - that| <= s / 508: 2^-16 of the group's largest value, finer than the bf16 or fp16 the
// activations came in (2^-9, 2^-12 of each value); the dot products are then exact integers.
// a and b are stored permuted within each 8 inputs as (0, 2, 4, 6, 1, 3, 5, 7): the bytes of
// `lo & 0x0F0F0F0F` are the q of inputs 0, 2, 4, 6 of the word and those of `(lo >> 4) &
// 0x0F0F0F0F` inputs 1, 3, 5, 7, so one dp4a multiplies four weights with no byte shuffle.
// The bits above 4 are spread into bit 4 and up of those bytes (Q5: 1, Q6_K: 2, Q8_0: 4 bits;
// Q8_0's q is made signed by flipping each byte's top bit, q - 128).
//
// A 32-lane group (a warp; half an AMD wavefront) computes ROWS output rows for MT tokens; lane l
// takes the 32-input groups l, l + 32, ... of the row: one 16-byte load of lo per group, the
// group's d (and m), and the x group's a, b, s and sums. Per group and token:
//     sum_j (d (q_j - Z) + m) x_j ~= d * (s * A + s/254 * B) + (m - d Z) * sum_j x_j
// with A = sum q_j a_j, B = sum q_j b_j from dp4a and sum x_j the exact fp32 sum of the inputs
// (per 16 for Q6_K, whose d is per 16). The lanes' fp32 sums are reduced by a fixed butterfly.
// Nothing depends on MT (how many tokens share the launch) but which tokens are computed: a
// token's outputs are the same bits whatever else is in the batch.

#include "gpu_compat.h"

namespace {

enum { Q_F32 = 0, Q_F16 = 1, Q_BF16 = 2 };
enum { Q_OK = 0, Q_EDTYPE = -1, Q_ESIZE = -2, Q_EALIGN = -3 };
// how the offset ZERO is removed: nothing (m carries it), subtracted through the x sums, or
// (Q8_0, ZERO 128) by flipping each byte's top bit before the signed dp4a
enum { Z_NONE = 0, Z_SUM = 1, Z_FLIP = 2 };

constexpr int kLanes = 32;       // lanes per row group (a CUDA warp, half a CDNA wavefront)
constexpr int kGroupsAtOnce = 4;  // 32-input groups each lane loads before it multiplies
constexpr int kThreads = 128;     // 4 row groups per block
constexpr int kMaxTokens = 4;

__device__ __forceinline__ int dp4a(int a, int b, int c) {
#if TSR_HIP
    // four signed byte products (the compiler forms v_dot4 where the target has it)
    return c + int(int8_t(a)) * int(int8_t(b)) + int(int8_t(a >> 8)) * int(int8_t(b >> 8)) +
           int(int8_t(a >> 16)) * int(int8_t(b >> 16)) + int(int8_t(a >> 24)) * int(int8_t(b >> 24));
#else
    return __dp4a(a, b, c);
#endif
}

// A 32-lane butterfly: every lane ends with the sum, always in the same order.
__device__ __forceinline__ float lanes_sum(float v, int width) {
    for (int m = width / 2; m > 0; m >>= 1) v += tsr_shfl_xor(v, m);
    return v;
}

template <typename T>
__global__ void TSR_LAUNCH_BOUNDS(256)
    q8x2_kernel(int8_t* __restrict__ xa, int8_t* __restrict__ xb, float* __restrict__ xs,
                float* __restrict__ xsum, const T* __restrict__ x, int64_t groups_total, int64_t G,
                int64_t x_stride) {
    const int lane = threadIdx.x % kLanes;
    const int64_t gi = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
    if (gi >= groups_total) return;  // the whole 32-lane group leaves together
    const int64_t t = gi / G, g = gi % G;
    const float v = tsr_to_float(x[t * x_stride + g * 32 + lane]);
    float amax = fabsf(v);
    float bad = (v - v == 0.0f) ? 0.0f : 1.0f;  // inf or NaN
    for (int m = kLanes / 2; m > 0; m >>= 1) {
        amax = fmaxf(amax, tsr_shfl_xor(amax, m));
        bad = fmaxf(bad, tsr_shfl_xor(bad, m));
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const float u = v * inv;
    const float a = fminf(fmaxf(rintf(u), -127.0f), 127.0f);
    const float b = fminf(fmaxf(rintf((u - a) * 254.0f), -127.0f), 127.0f);
    const int slot = (lane & ~7) + (lane & 1) * 4 + ((lane & 7) >> 1);
    const int64_t at = t * G * 32 + g * 32 + slot;
    xa[at] = int8_t(a);
    xb[at] = int8_t(b);
    // the exact fp32 sums of each 16 inputs (a butterfly within each half)
    const float half_sum = lanes_sum(v, 16);
    if (lane == 0) xs[gi] = bad != 0.0f ? __int_as_float(0x7fc00000) : amax / 127.0f;
    if (lane % 16 == 0) xsum[gi * 2 + lane / 16] = half_sum;
}

// The q bytes of a word's even inputs (A) and odd inputs (B), high bits included.
template <int HI, int ZK>
__device__ __forceinline__ void unpack_word(uint32_t lo, uint32_t hi_bits, int& A, int& B) {
    uint32_t a = lo & 0x0F0F0F0Fu, b = (lo >> 4) & 0x0F0F0F0Fu;
    if (HI == 4) {  // hi_bits: the word's 4-bit plane, the same order as lo
        a |= (hi_bits << 4) & 0xF0F0F0F0u;
        b |= hi_bits & 0xF0F0F0F0u;
    } else if (HI == 2) {  // hi_bits: 16 bits, input i's 2 bits at 2i; nibble c -> byte c
        uint32_t s = hi_bits & 0xFFFFu;
        s = (s | (s << 8)) & 0x00FF00FFu;
        s = (s | (s << 4)) & 0x0F0F0F0Fu;  // byte c: inputs 2c (bits 0-1) and 2c + 1 (bits 2-3)
        a |= (s & 0x03030303u) << 4;
        b |= (s & 0x0C0C0C0Cu) << 2;
    } else if (HI == 1) {  // hi_bits: 8 bits, input i's bit at i; bit pair c -> byte c
        uint32_t s = hi_bits & 0xFFu;
        s = (s | (s << 12)) & 0x000F000Fu;
        s = (s | (s << 6)) & 0x03030303u;  // byte c: inputs 2c (bit 0) and 2c + 1 (bit 1)
        a |= (s & 0x01010101u) << 4;
        b |= (s & 0x02020202u) << 3;
    }
    if (ZK == Z_FLIP) {
        a ^= 0x80808080u;
        b ^= 0x80808080u;
    }
    A = int(a);
    B = int(b);
}

template <typename T>
__device__ __forceinline__ void store_as(void* out, int64_t i, float v);
template <>
__device__ __forceinline__ void store_as<float>(void* out, int64_t i, float v) {
    static_cast<float*>(out)[i] = v;
}
template <>
__device__ __forceinline__ void store_as<tsr_half>(void* out, int64_t i, float v) {
    static_cast<tsr_half*>(out)[i] = tsr_from_float<tsr_half>(v);
}
template <>
__device__ __forceinline__ void store_as<tsr_bf16>(void* out, int64_t i, float v) {
    static_cast<tsr_bf16*>(out)[i] = tsr_from_float<tsr_bf16>(v);
}

__device__ __forceinline__ float load_any(const void* p, int64_t i, int dtype) {
    if (dtype == Q_F16) return tsr_to_float(static_cast<const tsr_half*>(p)[i]);
    if (dtype == Q_BF16) return tsr_to_float(static_cast<const tsr_bf16*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

struct GemvArgs {
    void* out;
    int64_t s_out;
    int out_dtype;
    const uint32_t* lo;
    const uint32_t* hi;
    const tsr_half* d;
    const tsr_half* m;
    const void* bias;  // nullptr: none
    int bias_dtype;
    const int8_t* xa;
    const int8_t* xb;
    const float* xs;
    const float* xsum;
    int64_t N, K, s_lo, s_hi, s_d, s_m;
    float zero;
};

// HI: bits above 4 (0, 1, 2, 4); GROUP: inputs per d (32, or 16 for Q6_K); HAS_M: an fp16 m per
// 32 inputs; ZK: how ZERO goes; MT tokens; ROWS output rows per 32-lane group.
template <int HI, int GROUP, bool HAS_M, int ZK, int MT, int ROWS>
__global__ void TSR_LAUNCH_BOUNDS(kThreads) qgemv_kernel(const GemvArgs p) {
    const int lane = threadIdx.x % kLanes;
    const int64_t row0 = (int64_t(blockIdx.x) * (kThreads / kLanes) + threadIdx.x / kLanes) * ROWS;
    if (row0 >= p.N) return;  // the whole 32-lane group leaves together
    const int G = int(p.K / 32);
    int64_t rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = row0 + r < p.N ? row0 + r : row0;  // a spare row: not stored
    float acc[MT][ROWS];
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[t][r] = 0.0f;

    for (int g0 = 0; g0 < G; g0 += kLanes * kGroupsAtOnce) {
        // every load of kGroupsAtOnce groups first, so that many bytes are in flight per lane
        uint4 lo[kGroupsAtOnce][ROWS];
        uint4 hi[kGroupsAtOnce][ROWS];
        float dv[kGroupsAtOnce][ROWS][GROUP == 16 ? 2 : 1];
        float mv[kGroupsAtOnce][ROWS];
#pragma unroll
        for (int u = 0; u < kGroupsAtOnce; ++u) {
            const int g = g0 + u * kLanes + lane;
            if (g >= G) continue;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                lo[u][r] = *reinterpret_cast<const uint4*>(p.lo + rows[r] * p.s_lo + int64_t(g) * 4);
                if (HI == 4) {
                    hi[u][r] = *reinterpret_cast<const uint4*>(p.hi + rows[r] * p.s_hi + int64_t(g) * 4);
                } else if (HI == 2) {
                    const uint2 h = *reinterpret_cast<const uint2*>(p.hi + rows[r] * p.s_hi + int64_t(g) * 2);
                    hi[u][r] = make_uint4(h.x, h.y, 0u, 0u);
                } else if (HI == 1) {
                    hi[u][r] = make_uint4(p.hi[rows[r] * p.s_hi + g], 0u, 0u, 0u);
                } else {
                    hi[u][r] = make_uint4(0u, 0u, 0u, 0u);
                }
                if (GROUP == 16) {
                    dv[u][r][0] = tsr_to_float(p.d[rows[r] * p.s_d + int64_t(g) * 2]);
                    dv[u][r][GROUP == 16 ? 1 : 0] = tsr_to_float(p.d[rows[r] * p.s_d + int64_t(g) * 2 + 1]);
                } else {
                    dv[u][r][0] = tsr_to_float(p.d[rows[r] * p.s_d + g]);
                }
                mv[u][r] = HAS_M ? tsr_to_float(p.m[rows[r] * p.s_m + g]) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < kGroupsAtOnce; ++u) {
            const int g = g0 + u * kLanes + lane;
            if (g >= G) continue;
            int A[ROWS][4], B[ROWS][4];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const uint32_t w[4] = {lo[u][r].x, lo[u][r].y, lo[u][r].z, lo[u][r].w};
                const uint32_t h4[4] = {hi[u][r].x, hi[u][r].y, hi[u][r].z, hi[u][r].w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    uint32_t hb = 0u;
                    if (HI == 4) hb = h4[k];
                    if (HI == 2) hb = h4[k / 2] >> (16 * (k % 2));
                    if (HI == 1) hb = h4[0] >> (8 * k);
                    unpack_word<HI, ZK>(w[k], hb, A[r][k], B[r][k]);
                }
            }
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                const int64_t xo = int64_t(t) * p.K + int64_t(g) * 32;
                const int4 a0 = *reinterpret_cast<const int4*>(p.xa + xo);
                const int4 a1 = *reinterpret_cast<const int4*>(p.xa + xo + 16);
                const int4 b0 = *reinterpret_cast<const int4*>(p.xb + xo);
                const int4 b1 = *reinterpret_cast<const int4*>(p.xb + xo + 16);
                // per word k: x bytes of its even inputs, then its odd ones
                const int xa8[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const int xb8[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
                const int64_t xg = int64_t(t) * G + g;
                const float s = p.xs[xg];
                const float sb = s * (1.0f / 254.0f);
                const float2 sum16 = *reinterpret_cast<const float2*>(p.xsum + xg * 2);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    int ia[2] = {0, 0}, ib[2] = {0, 0};
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        ia[k / 2] = dp4a(A[r][k], xa8[2 * k], ia[k / 2]);
                        ia[k / 2] = dp4a(B[r][k], xa8[2 * k + 1], ia[k / 2]);
                        ib[k / 2] = dp4a(A[r][k], xb8[2 * k], ib[k / 2]);
                        ib[k / 2] = dp4a(B[r][k], xb8[2 * k + 1], ib[k / 2]);
                    }
                    float v;
                    if (GROUP == 16) {
                        const float d0 = dv[u][r][0], d1 = dv[u][r][GROUP == 16 ? 1 : 0];
                        const float h0 = __fmaf_rn(sb, float(ib[0]), s * float(ia[0]));
                        const float h1 = __fmaf_rn(sb, float(ib[1]), s * float(ia[1]));
                        v = __fmaf_rn(d0, h0, d1 * h1);
                        if (ZK == Z_SUM) v = __fmaf_rn(-p.zero, __fmaf_rn(d0, sum16.x, d1 * sum16.y), v);
                    } else {
                        const float h = __fmaf_rn(sb, float(ib[0] + ib[1]), s * float(ia[0] + ia[1]));
                        float off = 0.0f;
                        if (HAS_M) off = mv[u][r];
                        if (ZK == Z_SUM) off = __fmaf_rn(-p.zero, dv[u][r][0], off);
                        v = dv[u][r][0] * h;
                        if (HAS_M || ZK == Z_SUM) v = __fmaf_rn(off, sum16.x + sum16.y, v);
                    }
                    acc[t][r] += v;
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float y = lanes_sum(acc[t][r], kLanes);
            const int64_t row = row0 + r;
            if (lane != 0 || row >= p.N) continue;
            const float out = p.bias != nullptr ? y + load_any(p.bias, row, p.bias_dtype) : y;
            const int64_t at = int64_t(t) * p.s_out + row;
            if (p.out_dtype == Q_F16)
                store_as<tsr_half>(p.out, at, out);
            else if (p.out_dtype == Q_BF16)
                store_as<tsr_bf16>(p.out, at, out);
            else
                store_as<float>(p.out, at, out);
        }
}

int launched() {
    const tsr_error_t e = tsr_get_last_error();
    return e == tsr_success ? Q_OK : int(e);
}

template <int HI, int GROUP, bool HAS_M, int ZK, int MT>
int gemv_mt(const GemvArgs& p, tsr_stream_t stream) {
    constexpr int ROWS = MT == 1 ? 1 : 2;  // more tokens: x loads shared by two rows
    constexpr int rows_per_block = (kThreads / kLanes) * ROWS;
    const int64_t blocks = (p.N + rows_per_block - 1) / rows_per_block;
    qgemv_kernel<HI, GROUP, HAS_M, ZK, MT, ROWS><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(p);
    return launched();
}

template <int HI, int GROUP, bool HAS_M, int ZK>
int gemv_form(const GemvArgs& p, int64_t M, tsr_stream_t stream) {
    switch (M) {
        case 1: return gemv_mt<HI, GROUP, HAS_M, ZK, 1>(p, stream);
        case 2: return gemv_mt<HI, GROUP, HAS_M, ZK, 2>(p, stream);
        case 3: return gemv_mt<HI, GROUP, HAS_M, ZK, 3>(p, stream);
        case 4: return gemv_mt<HI, GROUP, HAS_M, ZK, 4>(p, stream);
        default: return Q_ESIZE;
    }
}

// Every form's kernels, for the library's load check (tessera_cuda_check).
template <int HI, int GROUP, bool HAS_M, int ZK, typename F>
void each_mt(F&& f) {
    f(&qgemv_kernel<HI, GROUP, HAS_M, ZK, 1, 1>);
    f(&qgemv_kernel<HI, GROUP, HAS_M, ZK, 2, 2>);
    f(&qgemv_kernel<HI, GROUP, HAS_M, ZK, 3, 2>);
    f(&qgemv_kernel<HI, GROUP, HAS_M, ZK, 4, 2>);
}

}  // namespace

// Loads every kernel of this file now; the first error, or 0 (called by tessera_cuda_check).
int tsr_qgemv_probe(void) {
    int rc = Q_OK;
    auto probe = [&rc](auto* kernel) {
        tsr_func_attributes_t attr;
        const tsr_error_t e = tsr_func_get_attributes(&attr, kernel);
        if (e != tsr_success && rc == Q_OK) rc = int(e);
    };
    probe(&q8x2_kernel<float>);
    probe(&q8x2_kernel<tsr_half>);
    probe(&q8x2_kernel<tsr_bf16>);
    each_mt<0, 32, false, Z_SUM>(probe);
    each_mt<0, 32, true, Z_NONE>(probe);
    each_mt<1, 32, false, Z_SUM>(probe);
    each_mt<1, 32, true, Z_NONE>(probe);
    each_mt<4, 32, false, Z_FLIP>(probe);
    each_mt<2, 16, false, Z_SUM>(probe);
    return rc;
}

extern "C" {

// x [M, K] (row stride x_stride, K a multiple of 32) of dtype 0/1/2 (fp32/fp16/bf16) -> xa, xb
// int8 [M, K] (the two levels, permuted within each 8 inputs), xs fp32 [M, K/32] (the scale s;
// NaN where the group holds an inf or NaN), xsum fp32 [M, K/16] (the sums of each 16 inputs).
int tessera_cuda_q8x2_quantize(void* xa, void* xb, void* xs, void* xsum, const void* x, int64_t M, int64_t K,
                               int64_t x_stride, int dtype, void* stream) {
    if (M < 0 || K <= 0 || K % 32 || x_stride < K) return Q_ESIZE;
    const int64_t groups = M * (K / 32);
    if (groups == 0) return Q_OK;
    const int64_t blocks = (groups * kLanes + 255) / 256;
    if (blocks > 2147483647LL) return Q_ESIZE;
    tsr_stream_t s = static_cast<tsr_stream_t>(stream);
    int8_t* a = static_cast<int8_t*>(xa);
    int8_t* b = static_cast<int8_t*>(xb);
    float* sc = static_cast<float*>(xs);
    float* su = static_cast<float*>(xsum);
    switch (dtype) {
        case Q_F32:
            q8x2_kernel<float><<<dim3(unsigned(blocks)), 256, 0, s>>>(a, b, sc, su, static_cast<const float*>(x),
                                                                     groups, K / 32, x_stride);
            break;
        case Q_F16:
            q8x2_kernel<tsr_half><<<dim3(unsigned(blocks)), 256, 0, s>>>(
                a, b, sc, su, static_cast<const tsr_half*>(x), groups, K / 32, x_stride);
            break;
        case Q_BF16:
            q8x2_kernel<tsr_bf16><<<dim3(unsigned(blocks)), 256, 0, s>>>(
                a, b, sc, su, static_cast<const tsr_bf16*>(x), groups, K / 32, x_stride);
            break;
        default: return Q_EDTYPE;
    }
    return launched();
}

// out [M, N] (row stride s_out, dtype out_dtype) = x @ W.T (+ bias [N] of bias_dtype), M <= 4,
// from the quantized x of tessera_cuda_q8x2_quantize and W's planes (row strides in elements;
// lo, a, b and a 4-bit hi 16-byte aligned, a 2-bit hi and the sums 8-byte aligned, else -3). The form: hi_bits, group, zero,
// has_m as gguf_layout.FORMS; only the forms of the eight GGUF schemes are built.
int tessera_cuda_qgemv(void* out, int64_t s_out, int out_dtype, const void* lo, const void* hi, const void* d,
                       const void* m, const void* bias, int bias_dtype, const void* xa, const void* xb,
                       const void* xs, const void* xsum, int64_t M, int64_t N, int64_t K, int64_t s_lo,
                       int64_t s_hi, int64_t s_d, int64_t s_m, int hi_bits, int group, int zero, int has_m,
                       void* stream) {
    if (M < 0 || M > kMaxTokens || N < 0 || K <= 0 || K % 32 || K / 32 > 2147483647LL || s_out < N ||
        s_lo < K / 8)
        return Q_ESIZE;
    if (out_dtype < Q_F32 || out_dtype > Q_BF16 || bias_dtype < Q_F32 || bias_dtype > Q_BF16) return Q_EDTYPE;
    // the vector loads' alignment: a misaligned address is a sticky error that ends the context
    const auto at = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
    if ((at(lo) | at(xa) | at(xb)) & 15 || s_lo % 4 || at(xsum) & 7 || at(xs) & 3) return Q_EALIGN;
    if ((hi_bits == 4 && (at(hi) & 15 || s_hi % 4)) || (hi_bits == 2 && (at(hi) & 7 || s_hi % 2))) return Q_EALIGN;
    if (M == 0 || N == 0) return Q_OK;
    if ((N + 3) / 4 > 2147483647LL) return Q_ESIZE;
    GemvArgs p;
    p.out = out;
    p.s_out = s_out;
    p.out_dtype = out_dtype;
    p.lo = static_cast<const uint32_t*>(lo);
    p.hi = static_cast<const uint32_t*>(hi);
    p.d = static_cast<const tsr_half*>(d);
    p.m = static_cast<const tsr_half*>(m);
    p.bias = bias;
    p.bias_dtype = bias_dtype;
    p.xa = static_cast<const int8_t*>(xa);
    p.xb = static_cast<const int8_t*>(xb);
    p.xs = static_cast<const float*>(xs);
    p.xsum = static_cast<const float*>(xsum);
    p.N = N;
    p.K = K;
    p.s_lo = s_lo;
    p.s_hi = s_hi;
    p.s_d = s_d;
    p.s_m = s_m;
    p.zero = float(zero);
    tsr_stream_t s = static_cast<tsr_stream_t>(stream);
    if (hi_bits == 0 && group == 32 && !has_m && zero > 0) return gemv_form<0, 32, false, Z_SUM>(p, M, s);
    if (hi_bits == 0 && group == 32 && has_m && zero == 0) return gemv_form<0, 32, true, Z_NONE>(p, M, s);
    if (hi_bits == 1 && group == 32 && !has_m && zero > 0) return gemv_form<1, 32, false, Z_SUM>(p, M, s);
    if (hi_bits == 1 && group == 32 && has_m && zero == 0) return gemv_form<1, 32, true, Z_NONE>(p, M, s);
    if (hi_bits == 4 && group == 32 && !has_m && zero == 128) return gemv_form<4, 32, false, Z_FLIP>(p, M, s);
    if (hi_bits == 2 && group == 16 && !has_m && zero > 0) return gemv_form<2, 16, false, Z_SUM>(p, M, s);
    return Q_EDTYPE;
}

}  // extern "C"
