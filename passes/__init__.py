"""Graph passes. Importing this package registers every built-in pass."""

from . import awq, calibrate, canonicalize, cle, gptq, quantize, smooth_quant  # noqa: F401
