"""Loading and saving models with onnx_ir: lazy external data, IR-version caps,
opset conversion through onnx's version converter, fixed input shapes.

Weights stay lazy (memory-mapped external tensors) until a pass touches them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .errors import ModelError, UsageError
from .weight_store import unmapped

# onnx 1.23 writes IR 14 by default; the onnxruntime we pin (1.31) reads at most 13.
MAX_IR_VERSION = 13
# Protobuf cannot hold a model over 2 GiB: save weights externally past this.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# IR version that first carries each opset (onnx.helper.VERSION_TABLE, inverted).
_MIN_IR_FOR_OPSET = {max(row[2] for row in onnx.helper.VERSION_TABLE if row[1] == ir_v): ir_v
                     for ir_v in {row[1] for row in onnx.helper.VERSION_TABLE}}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load `path` lazily; every user mistake becomes one ModelError."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is an empty file (0 bytes)", hint="re-export or re-copy the model")
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf DecodeError, truncated files, random bytes
        raise ModelError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})",
                         hint="check the file is complete (not truncated) and was exported as ONNX") from None
    if not model.graph.outputs or model.graph.num_nodes() == 0:
        raise ModelError(f"{path} holds an empty graph (no nodes or no outputs)")
    check_external_data(model, path)
    for value in model.graph.initializers.values():   # read at each use, never left mapped
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = unmapped(value.const_value)
    return model


def check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.path)
            if not data.exists():
                raise ModelError(
                    f"initializer {value.name!r} of {path.name} refers to external data file "
                    f"{tensor.location!r}, which is missing (looked in {data.parent})",
                    hint="keep the .data file next to the model, under the name the model records")
            if not os.access(data, os.R_OK):
                raise ModelError(f"external data file {data} (initializer {value.name!r}) is not readable",
                                 hint="check its permissions")
            if tensor.offset is not None and tensor.length is not None:
                size = data.stat().st_size
                if size < (tensor.offset or 0) + tensor.length:
                    raise ModelError(f"external data file {data} ends at byte {size}, but initializer {value.name!r} "
                                     f"is at bytes {tensor.offset or 0}..{(tensor.offset or 0) + tensor.length} "
                                     "(truncated?)", hint="re-copy the .data file next to the model")


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """Convert the default-domain opset with onnx's version converter (never relabel).

    The converter gets the graph without its weights: weights in memory of 1 MiB or more are
    handed over as external references (the converter rewrites nodes, not weights; its copies
    of a model's inline weights took 9x their size, 4.9 GB for SmolLM2-135M), and every weight
    it saw only as a reference is put back by name afterwards, the same tensor object."""
    if opset_of(model) == target:
        return model
    kept = {}   # name -> the tensor the converter sees as a reference
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            kept[value.name] = tensor
        elif tensor is not None and tensor.nbytes >= _DETACH_BYTES:
            kept[value.name] = tensor
            value.const_value = ir.ExternalTensor("qcompile-detached", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir="")
    try:
        proto = ir.to_proto(model)
    finally:
        for value in model.graph.initializers.values():
            if value.name in kept:
                value.const_value = kept[value.name]
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        raise ModelError(f"the model is over 2 GB and at opset {opset_of(model)}; onnx's version "
                         f"converter cannot convert it to opset {target} in memory",
                         hint=f"convert it to opset {target} before compiling, then retry")
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as err:
        raise ModelError(f"onnx's version converter could not take the model from opset "
                         f"{opset_of(model)} to {target}: {err}") from None
    del proto
    result = ir.from_proto(converted)
    for value in result.graph.initializers.values():   # external ones keep their folder and stay unmapped
        if value.name in kept:
            value.const_value = kept[value.name]
    return result


_DETACH_BYTES = 1 << 20


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def ir_version_for(opset: int) -> int:
    """Lowest IR version carrying `opset`, capped at what onnxruntime reads."""
    needed = min((irv for version, irv in _MIN_IR_FOR_OPSET.items() if version >= opset), default=MAX_IR_VERSION)
    return min(max(needed, 7), MAX_IR_VERSION)


def set_ir_version(model: ir.Model) -> None:
    model.ir_version = ir_version_for(opset_of(model))


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Save to `path` (plus `<name>.data` when external); returns the files written."""
    path = Path(path)
    set_ir_version(model)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        data_name = path.name + ".data"
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
        return [path, path.with_name(data_name)]
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        ir.external_data.load_to_model(model)  # inline what still points at the input's .data file
    ir.save(model, path)
    return [path]


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """`NAME:D,D,...` → {NAME: [D, ...]}."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
            if any(d < 0 for d in shapes[name]):  # 0: an empty axis (a prefill's past length)
                raise ValueError
        except ValueError:
            raise UsageError(f"bad --input-shape {spec!r}", hint="use NAME:D,D,... e.g. x:1,3,640,640") from None
    return shapes


def fix_input_shapes(model: ir.Model, shapes: dict[str, list[int]]) -> None:
    """Pin dynamic input dimensions and re-infer the shapes inside the graph."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UsageError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        value = inputs[name]
        old = value.shape
        if old is not None:
            if len(old) != len(dims):
                raise UsageError(f"--input-shape {name}: rank {len(dims)} but the model input has rank {len(old)}")
            for i, (o, d) in enumerate(zip(old, dims)):
                if isinstance(o, int) and o >= 0 and o != d:
                    raise UsageError(f"--input-shape {name}: dimension {i} is fixed to {o} in the model, not {d}")
        value.shape = ir.Shape(dims)
    infer_shapes(model)


def dynamic_inputs(model: ir.Model) -> dict[str, list]:
    """Inputs with a dimension that is not a fixed integer."""
    return {v.name: list(v.shape) if v.shape is not None else None for v in model.graph.inputs
            if v.shape is None or any(not isinstance(d, int) or d < 0 for d in v.shape)}


def fixed_batch_size(model: ir.Model) -> tuple[int | None, bool]:
    """(the model's fixed batch size, True) if axis 0 of its inputs is pinned, else (None, False)."""
    sizes = {v.shape[0] for v in model.graph.inputs
             if v.shape is not None and len(v.shape) > 0 and v.name not in model.graph.initializers}
    fixed = [s for s in sizes if isinstance(s, int) and s > 0]
    return (fixed[0], True) if fixed else (None, False)


def infer_shapes(model: ir.Model) -> None:
    """Clear stale intermediate shapes and run onnx shape inference over the IR."""
    graph_io = set(model.graph.inputs) | set(model.graph.outputs)
    for node in model.graph:
        for out in node.outputs:
            if out not in graph_io:
                out.shape = None
    if any(node.op_type in _SEQUENCE_OPS for node in ir.traversal.RecursiveGraphIterator(model.graph)):
        return  # onnx_ir's ShapeInferencePass types sequence values as tensors (onnx's node tests): leave them
    try:
        common_passes.ShapeInferencePass(strict_mode=False)(model)
    except Exception as err:
        raise ModelError(f"shape inference failed: {err}") from None


_SEQUENCE_OPS = {"SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
                 "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap", "Optional",
                 "OptionalGetElement", "OptionalHasElement"}


def infer_symbolic_shapes(model: ir.Model) -> bool:
    """onnxruntime's symbolic shape inference over the IR (weights stay out of the proto).

    Unlike onnx's, it follows Shape→Gather→Concat arithmetic and merges equal symbolic
    dimensions, which the attention fusion rules check (mask dims, head dims). Returns False,
    leaving the model's shapes as they were, where it cannot handle the graph."""
    from onnx_ir.passes.common import _c_api_utils, shape_inference  # the weight-free proto round trip
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def run(proto):
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)

    try:
        inferred = _c_api_utils.call_onnx_api(run, model)
    except Exception:  # noqa: BLE001 - its failures are asserts and KeyErrors on unknown ops
        return False
    if inferred is None:
        return False
    shape_inference._merge_func(model, inferred)
    return True
