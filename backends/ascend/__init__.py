"""Huawei Ascend targets (ascend310b, ascend310p, ascend910b): descriptors (*.yaml), ATC's ONNX
operator list (atc_onnx_ops.txt), the capability check, the `ascend_lower` pass, the reference
lowering used for verification, and the emitted atc.sh / model.qdq.onnx. See docs/ascend.md."""

from . import lower  # noqa: F401  (registers ascend_lower)
from .capabilities import check_recipe  # noqa: F401  (the family hook qcompile.targets calls)


def reference_lowering(model, report: dict | None = None):
    """(reference lowering, label) for an Ascend deploy graph (AscendQuant & co.), else None;
    the AscendQuant compute dtype is the one the compile recorded (report.json → ascend), else
    float16 as every Ascend descriptor has it."""
    from .reference import ASCEND_OPS, reference_model
    if not any(node.op_type in ASCEND_OPS for node in model.graph):
        return None
    dtype = ((report or {}).get("ascend") or {}).get("quant_compute_dtype", "float16")
    return reference_model(model, dtype), f"reference lowering of the Ascend graph (quant compute {dtype})"
