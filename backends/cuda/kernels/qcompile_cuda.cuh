// Shared device helpers of qcompile's generated CUDA kernels (copied beside them as is).
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(_WIN32)
#define QCOMPILE_EXPORT extern "C" __declspec(dllexport)
#else
#define QCOMPILE_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace qcompile {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The sum (or max) over a block of THREADS threads, returned to every thread. `scratch`
// holds THREADS / 32 floats; the block synchronises twice.
template <int THREADS, bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  constexpr int WARPS = THREADS / 32;
  v = MAX ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < WARPS ? scratch[lane] : (MAX ? 0.f : 0.f);
  r = MAX ? warp_max(r) : warp_sum(r);
  __syncthreads();   // scratch may be reused by the caller's next reduction
  return r;
}

// QuantizeLinear's int8 arithmetic: round half to even of x / s (IEEE division), saturated.
__device__ __forceinline__ int8_t quantize_int8(float x, float s, int lo, int hi) {
  float r = rintf(__fdiv_rn(x, s));
  r = fminf(fmaxf(r, float(lo)), float(hi));
  return static_cast<int8_t>(r);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace qcompile
