"""Graph passes. Importing this package registers every built-in pass."""

from . import adopt_qdq, awq, calibrate, canonicalize, cle, equalize_outputs, fuse, gptq, kv_cache  # noqa: F401
from . import quantize, quantize_attention, smooth_quant, sparsify  # noqa: F401
