"""qcompile: a declarative graph-rewriting compiler over ONNX for quantized deployment."""

from .compile import CompileResult
from .driver import compile_model
from .errors import QCompileError

__version__ = "0.1.0"
__all__ = ["compile_model", "CompileResult", "QCompileError", "__version__"]
