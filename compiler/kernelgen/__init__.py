"""Kernel generation: typed specs -> Jinja templates -> sources -> a built library.

A lowering pass (e.g. backends/cpu/kernels.py) replaces ops onnxruntime has no fused
quantized kernel for by `com.qcompile` nodes and collects one `KernelSpec` per distinct
specialisation; `render` turns specs into sources with the family's templates; `build`
compiles them (cached by content hash) into the library every onnxruntime session of the
compile registers, so verification checks the very kernels that ship.
"""

from .spec import DOMAIN, KernelSpec, manifest

__all__ = ["DOMAIN", "KernelSpec", "manifest"]
