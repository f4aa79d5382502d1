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
inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}
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

// Softmax's numerator over a row in place, p = exp(p - peak), and its sum (the scalar paths; the
// vector ones are simd.j2's exp_shift_sum_<isa>, whose tails do the same).
inline float exp_shift_sum_scalar(float* p, int64_t n, float peak) {
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = std::exp(p[t] - peak);
    sum += p[t];
  }
  return sum;
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

// Round half to even, saturate to int8 [-128, 127]: ONNX QuantizeLinear with a zero zero point.
inline int8_t saturate_int8(float x, float scale) {
  float r = std::nearbyint(x / scale);
  return static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, r)));
}

// One QAttentionKVCache call: the dims its spec leaves to run time and the tensors.
struct AttentionCall {
  int64_t batch = 0, seq = 0, past = 0;          // the cache holds past + seq positions after the call
  const float* query = nullptr;                  // [batch, seq, q_heads * head_dim]
  const float* key = nullptr;                    // [batch, kv_heads, seq, head_dim], this step's keys
  const float* value = nullptr;                  // [batch, kv_heads, seq, head_dim]
  const int8_t* past_key = nullptr;              // [batch, kv_heads, past, head_dim]
  const int8_t* past_value = nullptr;
  const float* bias = nullptr;                   // [bias_batch, bias_heads, seq, past + seq] or none
  int64_t bias_batch = 1, bias_heads = 1;        // 1 (broadcast) or batch / q_heads
  float* out = nullptr;                          // [batch, seq, q_heads * head_dim]
  int8_t* present_key = nullptr;                 // [batch, kv_heads, past + seq, head_dim]
  int8_t* present_value = nullptr;
};

// Attention over an int8 KV cache: appends this step's keys and values to the cache,
// quantized, and attends to the whole cache without ever widening it to a float tensor.
class QAttentionKVCacheKernel {
 public:
  virtual ~QAttentionKVCacheKernel() = default;
  virtual int64_t head_dim() const = 0;
  virtual int64_t q_heads() const = 0;
  virtual int64_t kv_heads() const = 0;
  virtual int64_t scales() const = 0;     // how many cache scales per K (and per V): kv_heads or kv_heads * head_dim
  virtual const char* path() const = 0;   // "avx512", "avx2" or "scalar"
  virtual void run(const AttentionCall& call, const ParallelFor& parallel_for) const = 0;
};

using QAttentionKVCacheFactory = std::unique_ptr<QAttentionKVCacheKernel> (*)(
    const float* key_scale, const float* value_scale, float softmax_scale, const char* force_path);

// One QAttentionInt8 call (FA3 numerics): Q, K and V quantized to int8 per head on the way in.
struct Int8AttentionCall {
  int64_t batch = 0, seq = 0, kv_seq = 0;
  const float* query = nullptr;                  // [batch, seq, heads * head_dim]
  const float* key = nullptr;                    // [batch, kv_seq, heads * head_dim]
  const float* value = nullptr;                  // [batch, kv_seq, heads * head_dim]
  const float* bias = nullptr;                   // [bias_batch, bias_heads, seq, kv_seq] or none
  int64_t bias_batch = 1, bias_heads = 1;
  float* out = nullptr;                          // [batch, seq, heads * head_dim]
};

// Attention whose two products read int8 Q, K and V (one symmetric scale per head, or one for
// all): the products of int8 values are exact, softmax runs in fp32.
class QAttentionInt8Kernel {
 public:
  virtual ~QAttentionInt8Kernel() = default;
  virtual int64_t head_dim() const = 0;
  virtual int64_t heads() const = 0;
  virtual const char* path() const = 0;
  virtual void run(const Int8AttentionCall& call, const ParallelFor& parallel_for) const = 0;
};

using QAttentionInt8Factory = std::unique_ptr<QAttentionInt8Kernel> (*)(
    const float* q_scale, const float* k_scale, const float* v_scale, int64_t n_scales, float softmax_scale,
    const char* force_path);

// Residual add + LayerNorm (or RMSNorm) over the last dimension, a row at a time; gamma, beta
// and bias are the node's constants, taken when the session creates the kernel.
class SkipLayerNormKernel {
 public:
  virtual ~SkipLayerNormKernel() = default;
  virtual int64_t hidden() const = 0;
  virtual const char* path() const = 0;   // "avx512", "avx2" or "scalar"
  // x [rows, H]; skip [skip_rows, H], row r reads skip row r % skip_rows; sum (or null) [rows, H]
  // receives x + skip + bias, out [rows, H] the normalised rows.
  virtual void run(const float* x, const float* skip, int64_t skip_rows, float* sum, float* out, int64_t rows,
                   const ParallelFor& parallel_for) const = 0;
};

using SkipLayerNormFactory = std::unique_ptr<SkipLayerNormKernel> (*)(
    const float* gamma, const float* beta, const float* bias, float epsilon, const char* force_path);

}  // namespace qcompile
