// Elementwise ops of a decoder layer: RMSNorm (+ residual add), rotary embedding (NeoX halves),
// SiLU-and-multiply, GELU(tanh)-and-multiply, for fp32/fp16/bf16 tensors.
//
// Each is an optimization of its torch reference in tessera.kernels.reference and rounds where
// the reference rounds: the math runs in fp32 and an intermediate the reference stores in the
// tensor dtype (x * rsqrt(...) before the weight, silu(gate) before the up multiply, each product
// of the rotation) is rounded to that dtype here too. Built with -fmad=false (hipcc:
// -ffp-contract=off) so no FMA fuses two roundings the reference keeps apart.
//
// Memory is read in chunks of 16 bytes (8 fp16/bf16 or 4 fp32 values), with one vector load
// where the chunk is 16-byte aligned and scalar loads where it is not; which one never changes
// the arithmetic, so a row's result does not depend on where in a batch it sits.
//
// The launchers are extern "C" (loaded with cffi): raw device pointers, sizes and strides in
// elements, a dtype code and the stream; they return 0, a negative TSR_E* code for arguments
// they refuse, or the runtime's error code when the launch failed.

#include "gpu_compat.h"

enum { TSR_F32 = 0, TSR_F16 = 1, TSR_BF16 = 2 };
enum { TSR_OK = 0, TSR_EDTYPE = -1, TSR_ESIZE = -2, TSR_EALIGN = -3 };  // -3: qgemv.cu

#define TSR_MAX_THREADS 1024
// gridDim.y's limit on both vendors
#define TSR_MAX_GRID_Y 65535
#define TSR_MAX_GRID_X 2147483647LL

namespace {

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// N values of S into fp32: 16-byte loads when `vec` (the caller checked the address), else
// scalar ones; only the first `count` are read, the rest are zero.
template <int N, typename S>
__device__ __forceinline__ void load_n(float (&dst)[N], const S* src, int count, bool vec) {
    static_assert((N * sizeof(S)) % 16 == 0, "a chunk is whole 16-byte words");
    if (vec && count == N) {
#pragma unroll
        for (int w = 0; w < int(N * sizeof(S) / 16); ++w) {
            const uint4 raw = reinterpret_cast<const uint4*>(src)[w];
            const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
            for (int i = 0; i < int(16 / sizeof(S)); ++i) dst[w * (16 / sizeof(S)) + i] = tsr_to_float(e[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = i < count ? tsr_to_float(src[i]) : 0.0f;
    }
}

// The first `count` of N fp32 values stored as T (rounding to nearest even).
template <int N, typename T>
__device__ __forceinline__ void store_n(T* dst, const float (&src)[N], int count, bool vec) {
    static_assert((N * sizeof(T)) % 16 == 0, "a chunk is whole 16-byte words");
    if (vec && count == N) {
#pragma unroll
        for (int w = 0; w < int(N * sizeof(T) / 16); ++w) {
            uint4 raw;
            T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int i = 0; i < int(16 / sizeof(T)); ++i) e[i] = tsr_from_float<T>(src[w * (16 / sizeof(T)) + i]);
            reinterpret_cast<uint4*>(dst)[w] = raw;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (i < count) dst[i] = tsr_from_float<T>(src[i]);
    }
}

// The sum over the block in one fixed order: a butterfly within each warp (every lane ends with
// the same bits, since a + b == b + a exactly), then the warps' sums in warp order. The order
// depends on blockDim only, which the launcher derives from the row length alone.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
#pragma unroll
    for (int m = TSR_WARP_SIZE / 2; m > 0; m >>= 1) v += tsr_shfl_xor(v, m);
    const int warp = threadIdx.x / TSR_WARP_SIZE, lane = threadIdx.x % TSR_WARP_SIZE;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        const int warps = blockDim.x / TSR_WARP_SIZE;
        for (int w = 0; w < warps; ++w) total += warp_sums[w];
        warp_sums[0] = total;
    }
    __syncthreads();
    return warp_sums[0];
}

// One block per row. Pass 1 sums the squares (and, with ADD, writes x + residual rounded to T,
// the tensor the reference normalizes and returns); pass 2 reads the row again (from L2: the
// thread reads the chunks it touched in pass 1) and writes weight * round(x * inv_rms).
template <typename T, bool ADD>
__global__ void TSR_LAUNCH_BOUNDS(TSR_MAX_THREADS)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ summed, const T* __restrict__ x,
                    const T* __restrict__ residual, const T* __restrict__ weight, int64_t n, int64_t x_stride,
                    int64_t res_stride, float eps) {
    constexpr int V = 16 / sizeof(T);
    __shared__ float warp_sums[TSR_MAX_WARPS];
    const int64_t row = blockIdx.x;
    const T* xr = x + row * x_stride;
    const T* rr = ADD ? residual + row * res_stride : nullptr;
    T* sr = ADD ? summed + row * n : nullptr;
    T* outr = out + row * n;
    const bool vec = aligned16(xr) && aligned16(outr) && aligned16(weight) &&
                     (!ADD || (aligned16(rr) && aligned16(sr)));
    const int64_t chunks = (n + V - 1) / V;

    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int count = int(min(int64_t(V), n - c * V));
        float v[V];
        load_n(v, xr + c * V, count, vec);
        if (ADD) {
            float r[V];
            load_n(r, rr + c * V, count, vec);
#pragma unroll
            for (int i = 0; i < V; ++i) v[i] = tsr_round_to<T>(v[i] + r[i]);
            store_n(sr + c * V, v, count, vec);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) acc += v[i] * v[i];  // padding is 0: adds nothing
    }
    const float total = block_sum(acc, warp_sums);
    // 1/sqrt rather than rsqrtf: correctly rounded, as torch's CPU rsqrt
    const float inv = 1.0f / sqrtf(total / float(n) + eps);

    const T* src = ADD ? sr : xr;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int count = int(min(int64_t(V), n - c * V));
        float v[V], w[V];
        load_n(v, src + c * V, count, vec);
        load_n(w, weight + c * V, count, vec);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = w[i] * tsr_round_to<T>(v[i] * inv);
        store_n(outr + c * V, v, count, vec);
    }
}

// One block per token; a thread takes V consecutive rotation pairs (i, i + D/2) of one head,
// the q heads first, then the k heads. cos/sin are rounded to T first, as the reference casts them.
template <typename T, typename C>
__global__ void TSR_LAUNCH_BOUNDS(TSR_MAX_THREADS)
    rotary_kernel(T* __restrict__ q_out, T* __restrict__ k_out, const T* __restrict__ q,
                  const T* __restrict__ k, const C* __restrict__ cos, const C* __restrict__ sin, int64_t q_heads,
                  int64_t k_heads, int64_t head_dim, int64_t q_stride, int64_t k_stride) {
    constexpr int V = 16 / sizeof(T);
    const int64_t tok = blockIdx.x;
    const int64_t half = head_dim / 2;
    // a token's work is small (heads * D/2 / V items): 32-bit division, the cheap kind
    const int per_head = int((half + V - 1) / V);
    const int items = int(q_heads + k_heads) * per_head;
    const C* cos_r = cos + tok * half;
    const C* sin_r = sin + tok * half;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
        const int64_t head = it / per_head, c = it % per_head;
        const int count = int(min(int64_t(V), half - c * V));
        const bool is_q = head < q_heads;
        const T* src = is_q ? q + tok * q_stride + head * head_dim
                            : k + tok * k_stride + (head - q_heads) * head_dim;
        T* dst = is_q ? q_out + (tok * q_heads + head) * head_dim
                      : k_out + (tok * k_heads + head - q_heads) * head_dim;
        const T* x1p = src + c * V;
        const T* x2p = x1p + half;
        T* o1p = dst + c * V;
        T* o2p = o1p + half;
        const bool vec = aligned16(x1p) && aligned16(x2p) && aligned16(o1p) && aligned16(o2p) &&
                         aligned16(cos_r + c * V) && aligned16(sin_r + c * V);
        float x1[V], x2[V], cs[V], sn[V];
        load_n(x1, x1p, count, vec);
        load_n(x2, x2p, count, vec);
        load_n(cs, cos_r + c * V, count, vec);
        load_n(sn, sin_r + c * V, count, vec);
        float o1[V], o2[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const float cr = tsr_round_to<T>(cs[i]), sr = tsr_round_to<T>(sn[i]);
            o1[i] = tsr_round_to<T>(x1[i] * cr) - tsr_round_to<T>(x2[i] * sr);
            o2[i] = tsr_round_to<T>(x2[i] * cr) + tsr_round_to<T>(x1[i] * sr);
        }
        store_n(o1p, o1, count, vec);
        store_n(o2p, o2, count, vec);
    }
}

enum { TSR_ACT_SILU = 0, TSR_ACT_GELU_TANH = 1 };

// The formulas of torch's CUDA kernels for F.silu and F.gelu(approximate="tanh"), in fp32.
template <int ACT>
__device__ __forceinline__ float activation(float g) {
    if (ACT == TSR_ACT_SILU) return g / (1.0f + expf(-g));
    const float beta = 0.7978845608028654f;  // sqrt(2 / pi)
    const float kappa = 0.044715f;
    const float inner = beta * (g + kappa * (g * g * g));
    return 0.5f * g * (1.0f + tanhf(inner));
}

// x rows are [gate | up], `inter` each; out rows are `inter` long. blockIdx.x is the row,
// blockIdx.y and the threads stride over the row's chunks.
template <typename T, int ACT>
__global__ void TSR_LAUNCH_BOUNDS(TSR_MAX_THREADS)
    act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t inter, int64_t x_stride) {
    constexpr int V = 16 / sizeof(T);
    const int64_t row = blockIdx.x;
    const T* gate = x + row * x_stride;
    const T* up = gate + inter;
    T* outr = out + row * inter;
    const int64_t chunks = (inter + V - 1) / V;
    for (int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; c < chunks;
         c += int64_t(gridDim.y) * blockDim.x) {
        const int count = int(min(int64_t(V), inter - c * V));
        const bool vec = aligned16(gate + c * V) && aligned16(up + c * V) && aligned16(outr + c * V);
        float g[V], u[V];
        load_n(g, gate + c * V, count, vec);
        load_n(u, up + c * V, count, vec);
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = tsr_round_to<T>(activation<ACT>(g[i])) * u[i];
        store_n(outr + c * V, g, count, vec);
    }
}

// Threads for `work` items: whole 64-thread groups (a warp count on every GPU), at most 1024.
unsigned threads_for(int64_t work) {
    const int64_t t = (work + TSR_BLOCK_MULTIPLE - 1) / TSR_BLOCK_MULTIPLE * TSR_BLOCK_MULTIPLE;
    return unsigned(t < TSR_BLOCK_MULTIPLE ? TSR_BLOCK_MULTIPLE : (t > TSR_MAX_THREADS ? TSR_MAX_THREADS : t));
}

int launched() {
    const tsr_error_t e = tsr_get_last_error();
    return e == tsr_success ? TSR_OK : int(e);
}

template <typename T>
int rms_norm_t(void* out, void* summed, const void* x, const void* residual, const void* weight, int64_t rows,
               int64_t n, int64_t x_stride, int64_t res_stride, float eps, tsr_stream_t stream) {
    constexpr int V = 16 / sizeof(T);
    const unsigned threads = threads_for((n + V - 1) / V);
    if (residual != nullptr)
        rms_norm_kernel<T, true><<<dim3(unsigned(rows)), threads, 0, stream>>>(
            static_cast<T*>(out), static_cast<T*>(summed), static_cast<const T*>(x),
            static_cast<const T*>(residual), static_cast<const T*>(weight), n, x_stride, res_stride, eps);
    else
        rms_norm_kernel<T, false><<<dim3(unsigned(rows)), threads, 0, stream>>>(
            static_cast<T*>(out), nullptr, static_cast<const T*>(x), nullptr, static_cast<const T*>(weight), n,
            x_stride, 0, eps);
    return launched();
}

int rms_norm_any(void* out, void* summed, const void* x, const void* residual, const void* weight, int64_t rows,
                 int64_t n, int64_t x_stride, int64_t res_stride, float eps, int dtype, void* stream) {
    if (rows < 0 || rows > TSR_MAX_GRID_X || n <= 0 || x_stride < n || (residual && res_stride < n))
        return TSR_ESIZE;
    if (rows == 0) return TSR_OK;
    tsr_stream_t s = static_cast<tsr_stream_t>(stream);
    switch (dtype) {
        case TSR_F32: return rms_norm_t<float>(out, summed, x, residual, weight, rows, n, x_stride, res_stride, eps, s);
        case TSR_F16:
            return rms_norm_t<tsr_half>(out, summed, x, residual, weight, rows, n, x_stride, res_stride, eps, s);
        case TSR_BF16:
            return rms_norm_t<tsr_bf16>(out, summed, x, residual, weight, rows, n, x_stride, res_stride, eps, s);
        default: return TSR_EDTYPE;
    }
}

template <typename T, typename C>
int rotary_t(void* q_out, void* k_out, const void* q, const void* k, const void* cos, const void* sin,
             int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t q_stride, int64_t k_stride,
             tsr_stream_t stream) {
    constexpr int V = 16 / sizeof(T);
    const unsigned threads = threads_for((q_heads + k_heads) * ((head_dim / 2 + V - 1) / V));
    rotary_kernel<T, C><<<dim3(unsigned(tokens)), threads, 0, stream>>>(
        static_cast<T*>(q_out), static_cast<T*>(k_out), static_cast<const T*>(q), static_cast<const T*>(k),
        static_cast<const C*>(cos), static_cast<const C*>(sin), q_heads, k_heads, head_dim, q_stride, k_stride);
    return launched();
}

template <int ACT>
int act_and_mul_any(void* out, const void* x, int64_t rows, int64_t inter, int64_t x_stride, int dtype,
                    void* stream) {
    if (rows < 0 || rows > TSR_MAX_GRID_X || inter <= 0 || x_stride < 2 * inter) return TSR_ESIZE;
    if (rows == 0) return TSR_OK;
    if (dtype != TSR_F32 && dtype != TSR_F16 && dtype != TSR_BF16) return TSR_EDTYPE;
    const int v = dtype == TSR_F32 ? 4 : 8;
    const int64_t chunks = (inter + v - 1) / v;
    const unsigned threads = threads_for(chunks > 256 ? 256 : chunks);
    int64_t gy = (chunks + threads - 1) / threads;
    gy = gy > TSR_MAX_GRID_Y ? TSR_MAX_GRID_Y : gy;
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(gy));
    tsr_stream_t s = static_cast<tsr_stream_t>(stream);
    switch (dtype) {
        case TSR_F32:
            act_and_mul_kernel<float, ACT>
                <<<grid, threads, 0, s>>>(static_cast<float*>(out), static_cast<const float*>(x), inter, x_stride);
            break;
        case TSR_F16:
            act_and_mul_kernel<tsr_half, ACT><<<grid, threads, 0, s>>>(
                static_cast<tsr_half*>(out), static_cast<const tsr_half*>(x), inter, x_stride);
            break;
        default:
            act_and_mul_kernel<tsr_bf16, ACT><<<grid, threads, 0, s>>>(
                static_cast<tsr_bf16*>(out), static_cast<const tsr_bf16*>(x), inter, x_stride);
            break;
    }
    return launched();
}

}  // namespace

int tsr_qgemv_probe(void);  // qgemv.cu

extern "C" {

// Bumped when a launcher's signature changes; native.py checks it against its cdef.
int tessera_cuda_abi_version(void) { return 2; }

// 0 when this library's kernels can run on the current device, else the runtime's error (no
// code for this GPU's architecture, a driver older than the runtime linked in). Asking for every
// kernel's attributes also loads them all now (the runtime loads modules lazily), so that no
// first launch has to load one in the middle of a CUDA graph capture.
int tessera_cuda_check(void) {
    int rc = TSR_OK;
    auto probe = [&rc](auto* kernel) {
        tsr_func_attributes_t attr;
        const tsr_error_t e = tsr_func_get_attributes(&attr, kernel);
        if (e != tsr_success && rc == TSR_OK) rc = int(e);
    };
    probe(&rms_norm_kernel<float, false>);
    probe(&rms_norm_kernel<float, true>);
    probe(&rms_norm_kernel<tsr_half, false>);
    probe(&rms_norm_kernel<tsr_half, true>);
    probe(&rms_norm_kernel<tsr_bf16, false>);
    probe(&rms_norm_kernel<tsr_bf16, true>);
    probe(&rotary_kernel<float, float>);
    probe(&rotary_kernel<tsr_half, float>);
    probe(&rotary_kernel<tsr_half, tsr_half>);
    probe(&rotary_kernel<tsr_bf16, float>);
    probe(&rotary_kernel<tsr_bf16, tsr_bf16>);
    probe(&act_and_mul_kernel<float, TSR_ACT_SILU>);
    probe(&act_and_mul_kernel<tsr_half, TSR_ACT_SILU>);
    probe(&act_and_mul_kernel<tsr_bf16, TSR_ACT_SILU>);
    probe(&act_and_mul_kernel<float, TSR_ACT_GELU_TANH>);
    probe(&act_and_mul_kernel<tsr_half, TSR_ACT_GELU_TANH>);
    probe(&act_and_mul_kernel<tsr_bf16, TSR_ACT_GELU_TANH>);
    const int q = tsr_qgemv_probe();
    return rc != TSR_OK ? rc : q;
}

const char* tessera_cuda_error_string(int code) {
    if (code == TSR_EDTYPE) return "unsupported dtype code";
    if (code == TSR_ESIZE) return "invalid sizes or strides";
    if (code == TSR_EALIGN) return "a pointer or row stride not aligned for the kernel's vector loads";
    return tsr_get_error_string(static_cast<tsr_error_t>(code));
}

// out [rows, n] = rms_norm(x [rows, n], row stride x_stride), weight [n]; all of one dtype.
int tessera_cuda_rms_norm(void* out, const void* x, const void* weight, int64_t rows, int64_t n, int64_t x_stride,
                          float eps, int dtype, void* stream) {
    return rms_norm_any(out, nullptr, x, nullptr, weight, rows, n, x_stride, 0, eps, dtype, stream);
}

// summed [rows, n] = x + residual (rounded to the dtype), out [rows, n] = rms_norm(summed).
// The inputs are left as they are: the reference returns the sum as a new tensor.
int tessera_cuda_fused_add_rms_norm(void* out, void* summed, const void* x, const void* residual,
                                    const void* weight, int64_t rows, int64_t n, int64_t x_stride,
                                    int64_t res_stride, float eps, int dtype, void* stream) {
    if (residual == nullptr || summed == nullptr) return TSR_ESIZE;
    return rms_norm_any(out, summed, x, residual, weight, rows, n, x_stride, res_stride, eps, dtype, stream);
}

// q_out [T, q_heads*D], k_out [T, k_heads*D] (contiguous) = the NeoX rotation of q and k (row
// strides q_stride, k_stride) by cos/sin [T, D/2] (contiguous), whose dtype cs_dtype is fp32 or
// the dtype of q and k.
int tessera_cuda_rotary_embedding(void* q_out, void* k_out, const void* q, const void* k, const void* cos,
                                  const void* sin, int64_t tokens, int64_t q_heads, int64_t k_heads,
                                  int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype, int cs_dtype,
                                  void* stream) {
    if (tokens < 0 || tokens > TSR_MAX_GRID_X || q_heads < 0 || k_heads < 0 || head_dim <= 0 || head_dim % 2 ||
        (q_heads + k_heads) * head_dim > INT32_MAX || q_stride < q_heads * head_dim || k_stride < k_heads * head_dim)
        return TSR_ESIZE;
    if (tokens == 0 || q_heads + k_heads == 0) return TSR_OK;
    if (cs_dtype != TSR_F32 && cs_dtype != dtype) return TSR_EDTYPE;
    tsr_stream_t s = static_cast<tsr_stream_t>(stream);
    const bool f32 = cs_dtype == TSR_F32;
    switch (dtype) {
        case TSR_F32:
            return rotary_t<float, float>(q_out, k_out, q, k, cos, sin, tokens, q_heads, k_heads, head_dim, q_stride,
                                          k_stride, s);
        case TSR_F16:
            return f32 ? rotary_t<tsr_half, float>(q_out, k_out, q, k, cos, sin, tokens, q_heads, k_heads, head_dim,
                                                   q_stride, k_stride, s)
                       : rotary_t<tsr_half, tsr_half>(q_out, k_out, q, k, cos, sin, tokens, q_heads, k_heads,
                                                      head_dim, q_stride, k_stride, s);
        case TSR_BF16:
            return f32 ? rotary_t<tsr_bf16, float>(q_out, k_out, q, k, cos, sin, tokens, q_heads, k_heads, head_dim,
                                                   q_stride, k_stride, s)
                       : rotary_t<tsr_bf16, tsr_bf16>(q_out, k_out, q, k, cos, sin, tokens, q_heads, k_heads,
                                                      head_dim, q_stride, k_stride, s);
        default: return TSR_EDTYPE;
    }
}

// out [rows, inter] = silu(x[:, :inter]) * x[:, inter:2*inter]; x's row stride x_stride.
int tessera_cuda_silu_and_mul(void* out, const void* x, int64_t rows, int64_t inter, int64_t x_stride, int dtype,
                              void* stream) {
    return act_and_mul_any<TSR_ACT_SILU>(out, x, rows, inter, x_stride, dtype, stream);
}

// out [rows, inter] = gelu_tanh(x[:, :inter]) * x[:, inter:2*inter] (Gemma's MLP).
int tessera_cuda_gelu_tanh_and_mul(void* out, const void* x, int64_t rows, int64_t inter, int64_t x_stride,
                                   int dtype, void* stream) {
    return act_and_mul_any<TSR_ACT_GELU_TANH>(out, x, rows, inter, x_stride, dtype, stream);
}

}  // extern "C"
