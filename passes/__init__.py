"""Graph passes. Importing this package registers every built-in pass."""

from . import awq, calibrate, canonicalize, gptq, quantize, smooth_quant  # noqa: F401
