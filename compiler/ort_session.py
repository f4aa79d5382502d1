"""onnxruntime sessions over in-memory IR models (the reference executor)."""

from __future__ import annotations

import contextlib
import contextvars
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from .model_io import EXTERNAL_DATA_THRESHOLD, save_model, set_ir_version, weight_bytes


# onnxruntime custom-op libraries (`--custom-ops`) every session of the current compile registers
_CUSTOM_OPS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcompile_custom_ops", default=())


# the kernel library the current compile generated (backends/cpu/generated_kernels.py): one per
# compile, so a trial compile's library never leaks into the next
_GENERATED: contextvars.ContextVar[str | None] = contextvars.ContextVar("qcompile_generated_kernels", default=None)


@contextlib.contextmanager
def generated_kernel_scope():
    """A compile: a library `use_generated_library` names inside is registered until it ends."""
    token = _GENERATED.set(None)
    try:
        yield
    finally:
        _GENERATED.reset(token)


def use_generated_library(path) -> None:
    """Every session of the current compile from now on registers this generated-kernel library."""
    _GENERATED.set(str(path))


@contextlib.contextmanager
def custom_op_libraries(paths: tuple[str, ...]):
    """Every session made inside registers these custom-op libraries."""
    token = _CUSTOM_OPS.set(tuple(paths))
    try:
        yield
    finally:
        _CUSTOM_OPS.reset(token)


def session_options(threads: int = 0, level: str = "all", optimized_path: str | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    for library in _CUSTOM_OPS.get():
        opts.register_custom_ops_library(library)
    if _GENERATED.get() is not None:
        opts.register_custom_ops_library(_GENERATED.get())
    return opts


def session_for(model: ir.Model, *, extra_outputs: list[ir.Value] = (), threads: int = 0, level: str = "all",
                optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU session over `model`, with `extra_outputs` exposed as graph outputs.

    The model is serialized (not mutated); models past protobuf's 2 GB limit go
    through a temporary file with external data.
    """
    set_ir_version(model)
    opts = session_options(threads, level, optimized_path)
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            outputs = list(model.graph.outputs)
            model.graph.outputs.extend(v for v in extra_outputs if v not in outputs)
            try:
                save_model(model, path, external_data=True)
            finally:
                del model.graph.outputs[len(outputs):]
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    base_dirs = {v.const_value.base_dir for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    if len(base_dirs) == 1:  # weights still in the input's .data file: tell onnxruntime where
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(base_dirs.pop()))
    elif base_dirs:
        model = ir.external_data.load_to_model(model)
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for value in extra_outputs:
        if value.name not in present:
            elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(value.name, elem, None))
            present.add(value.name)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
