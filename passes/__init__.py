"""Graph passes. Importing this package registers every built-in pass."""

from . import awq, calibrate, canonicalize, cle, fuse, gptq, kv_cache, quantize, quantize_attention, smooth_quant  # noqa: F401
