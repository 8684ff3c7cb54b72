// The one portability header between CUDA (nvcc) and HIP (hipcc): every .cu source in this
// folder includes it and nothing vendor-specific, so a kernel exists once and builds for both.
// Only what the sources use is here: stream and error types, the 16-bit float types and their
// conversions, the warp (wavefront) size and the xor shuffle.
#pragma once

#include <stdint.h>

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__)
#define TSR_HIP 1
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
// ROCm 6 has CUDA-style __hip_bfloat16; ROCm 5 (Debian's hipcc) only the struct hip_bfloat16,
// whose float constructor also rounds to nearest even.
#if __has_include(<hip/hip_bf16.h>)
#include <hip/hip_bf16.h>
#define TSR_HIP_BF16_STRUCT 0
#else
#include <hip/hip_bfloat16.h>
#define TSR_HIP_BF16_STRUCT 1
#endif

typedef hipStream_t tsr_stream_t;
typedef hipError_t tsr_error_t;
#define tsr_success hipSuccess
#define tsr_get_last_error hipGetLastError
#define tsr_get_error_string hipGetErrorString
typedef hipFuncAttributes tsr_func_attributes_t;
template <typename F>
inline tsr_error_t tsr_func_get_attributes(tsr_func_attributes_t* attr, F* kernel) {
    return hipFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
typedef __half tsr_half;
#if TSR_HIP_BF16_STRUCT
typedef hip_bfloat16 tsr_bf16;
#else
typedef __hip_bfloat16 tsr_bf16;
#endif

#else
#define TSR_HIP 0
#define TSR_HIP_BF16_STRUCT 0
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef cudaStream_t tsr_stream_t;
typedef cudaError_t tsr_error_t;
#define tsr_success cudaSuccess
#define tsr_get_last_error cudaGetLastError
#define tsr_get_error_string cudaGetErrorString
typedef cudaFuncAttributes tsr_func_attributes_t;
template <typename F>
inline tsr_error_t tsr_func_get_attributes(tsr_func_attributes_t* attr, F* kernel) {
    return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
typedef __half tsr_half;
typedef __nv_bfloat16 tsr_bf16;
#endif

// Warp size as a compile-time constant for device code. AMD's CDNA GPUs (gfx90a, gfx942) run
// 64-wide wavefronts, RDNA ones 32; the compiler says which for the target being built.
#if TSR_HIP
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define TSR_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define TSR_WARP_SIZE 64
#endif
#else
#define TSR_WARP_SIZE 32
#endif

// Host code cannot know the wavefront size at compile time (one binary, several targets): block
// sizes are multiples of this, a whole number of warps on every GPU either vendor makes.
#define TSR_BLOCK_MULTIPLE 64
// Enough per-warp slots for a 1024-thread block of 32-wide warps.
#define TSR_MAX_WARPS 32

#define TSR_LAUNCH_BOUNDS(n) __launch_bounds__(n)

__device__ __forceinline__ float tsr_shfl_xor(float v, int lane_mask) {
#if TSR_HIP
    return __shfl_xor(v, lane_mask);
#else
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

// Conversions, rounding to nearest even both ways: the same rounding torch's .to() does.
__device__ __forceinline__ float tsr_to_float(float v) { return v; }
__device__ __forceinline__ float tsr_to_float(tsr_half v) { return __half2float(v); }
#if TSR_HIP_BF16_STRUCT
__device__ __forceinline__ float tsr_to_float(tsr_bf16 v) { return float(v); }
#else
__device__ __forceinline__ float tsr_to_float(tsr_bf16 v) { return __bfloat162float(v); }
#endif

template <typename T>
__device__ __forceinline__ T tsr_from_float(float v);
template <>
__device__ __forceinline__ float tsr_from_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ tsr_half tsr_from_float<tsr_half>(float v) {
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ tsr_bf16 tsr_from_float<tsr_bf16>(float v) {
#if TSR_HIP_BF16_STRUCT
    return hip_bfloat16(v);
#else
    return __float2bfloat16_rn(v);
#endif
}

// v rounded to T and back: where the torch reference stores an intermediate in the tensor dtype.
template <typename T>
__device__ __forceinline__ float tsr_round_to(float v) {
    return tsr_to_float(tsr_from_float<T>(v));
}
