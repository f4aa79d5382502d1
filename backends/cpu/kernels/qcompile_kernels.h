// Shared helpers of qcompile's generated CPU kernels (copied beside every build; not generated).
//
// Kernel units include only this header, never onnxruntime's: register.cpp is the one unit
// that talks to onnxruntime's C API, so each kernel compiles in a fraction of a second and
// can be tested on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace qcompile {

// Runs fn(0..total-1), possibly on onnxruntime's intra-op threads.
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;

inline void serial_for(size_t total, const std::function<void(size_t)>& fn) {
  for (size_t i = 0; i < total; ++i) fn(i);
}

// Which instruction sets the running CPU has (the library is built without global -m flags;
// ISA paths are compiled per function with __attribute__((target)) and picked here).
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
inline bool cpu_has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// The per-token symmetric int8 scale of one row, exactly as the standard-op form computes it
// (compiler/dynamic_qdq.py): max(ReduceMax(|x|) / 127, 1e-12).
inline float per_token_scale(const float* x, int64_t k) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  return std::max(amax / 127.0f, 1e-12f);
}

// Round half to even (ONNX Round), then clip to [-127, 127].
inline int32_t quantize_value(float x, float scale) {
  float r = std::nearbyint(x / scale);
  return static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, r)));
}

// A per-token W8A8 MatMul specialisation: y[m, :] = (x[m, :] quantized) @ W, rescaled.
class QMatMulPerTokenKernel {
 public:
  virtual ~QMatMulPerTokenKernel() = default;
  virtual int64_t k() const = 0;
  virtual int64_t n() const = 0;
  virtual const char* path() const = 0;   // which ISA path runs: "avx512_vnni", "avx2" or "scalar"
  virtual void run(const float* x, float* y, int64_t m, const ParallelFor& parallel_for) const = 0;
};

using QMatMulPerTokenFactory = std::unique_ptr<QMatMulPerTokenKernel> (*)(
    const int8_t* weight, const float* weight_scale, int64_t n_scales, const float* bias, const char* force_path);

}  // namespace qcompile
