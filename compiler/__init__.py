"""qcompile: a declarative graph-rewriting compiler over ONNX for quantized deployment.

`compile_model` and `CompileResult` are imported on first use, so the CLI answers a usage
error or a missing file without loading onnx, onnxruntime and numpy first."""

from .errors import QCompileError

__version__ = "0.1.0"
__all__ = ["compile_model", "CompileResult", "QCompileError", "__version__"]


def __getattr__(name: str):
    if name == "compile_model":
        from .driver import compile_model
        return compile_model
    if name == "CompileResult":
        from .compile import CompileResult
        return CompileResult
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
