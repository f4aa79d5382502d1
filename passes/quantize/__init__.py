"""quantize: turn Conv, MatMul and Gemm into quantized layers, one scheme per layer.

The scheme (compiler/schemes.py) comes from the recipe's `weight`/`activation`, or for
layers matched by the recipe's `mix` table (glob → built-in scheme name or `float`)
from that scheme. What each layer becomes:

* weights: an int8/uint8/int4/uint4/FP8 initializer + DequantizeLinear, per tensor,
  per output channel, or per group along the reduction axis (ONNX `block_size`);
  rounded as the scheme says (stochastic rounding seeded per weight), or taken from a
  weight algorithm (gptq) through `PrecomputedWeights` (weights.py);
* static activations: one QuantizeLinear→DequantizeLinear pair per tensor from the
  calibrated range; Conv/Gemm biases become int32 at s_x·s_w (what onnxruntime needs
  to fuse an int8 kernel); ReLU/Clip fold into an asymmetric output quantization
  (activations.py);
* dynamic activations (per-token or per-tensor, scales at run time): standard ONNX
  integer ops (compiler/dynamic_qdq.py);
* `activation: null`: weight-only (W8A16, W4A16).

Which layers, with which scheme, and why each other candidate stays float is planned
first (plan.py); every decision lands in the layer table (compiler/layers.py) with its
reason, scheme and weight bytes.
"""

from .config import Fallback, QuantizeConfig, RangeGuard  # noqa: F401
from .quantize import Quantize  # noqa: F401
