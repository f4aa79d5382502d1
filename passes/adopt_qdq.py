"""adopt_qdq: take a model that is already quantized (a QDQ graph from onnxruntime's quantizer,
a QAT export, ModelOpt, Quark, or qcompile's own cpu output) as it is.

Its scales and rounded weights are the point of such a model (QAT learned them), so nothing
is recalibrated or re-rounded: this pass reads every Conv/MatMul/Gemm whose weight comes
through a DequantizeLinear of integer (or FP8) data into the layer table — weight dtype,
granularity, symmetry, and the activation's Q/DQ when there is one — so the report says what
the model holds and the target's lowering (cpu_lower, ascend_lower) takes it from there with
its own capability checks. `quantize` refuses such a model (it would quantize twice).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.errors import ModelError
from qcompile.facts import Fact
from qcompile.layers import LayerRecord, LayerStatus, WeightBytes
from qcompile.registry import QPass, register_pass
from qcompile.schemes import ActivationScheme, Scheme, WeightScheme

LAYER_OPS = ("Conv", "MatMul", "Gemm")
# integer-op forms onnxruntime's own quantizer writes (QOperator format) or kernels it fuses to
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
_DTYPES = {ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8", ir.DataType.INT4: "int4",
           ir.DataType.UINT4: "uint4", ir.DataType.FLOAT8E4M3FN: "float8e4m3fn",
           ir.DataType.FLOAT8E5M2: "float8e5m2"}


def quantized_layers(model: ir.Model) -> dict[str, str]:
    """{node name: op} of the layers the model already holds quantized: a Conv/MatMul/Gemm
    whose weight is DequantizeLinear of a constant, or an integer op (QLinearConv, MatMulNBits, ...)."""
    found = {}
    for node in model.graph:
        if node.op_type in INTEGER_OPS:
            found[node.name or node.op_type] = node.op_type
        elif node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx") and _weight_dq(node) is not None:
            found[node.name or node.op_type] = node.op_type
    return found


def _weight_dq(node: ir.Node) -> ir.Node | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    return dq if dq.inputs[0].const_value is not None else None


def _zero(dq: ir.Node) -> bool:
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    return zp is None or (zp.const_value is not None and not np.any(zp.const_value.numpy().astype(np.float64)))


def weight_scheme(dq: ir.Node) -> WeightScheme:
    dtype = _DTYPES.get(dq.inputs[0].dtype, str(dq.inputs[0].dtype).lower())
    scale = dq.inputs[1].const_value
    block = dq.attributes.get_int("block_size", 0)
    size = int(np.prod(scale.shape)) if scale is not None and scale.shape is not None else 1
    granularity = "per_group" if block else ("per_tensor" if size == 1 else "per_channel")
    return WeightScheme(dtype=dtype, granularity=granularity, group_size=block or 128, symmetric=_zero(dq))


def activation_scheme(node: ir.Node) -> ActivationScheme | None:
    x = node.inputs[0]
    dq = x.producer() if x is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    return ActivationScheme(dtype=_DTYPES.get(dq.inputs[0].dtype, "int8"), granularity="per_tensor",
                            symmetric=_zero(dq))


@register_pass("adopt_qdq")
class AdoptQDQ(QPass):
    """Read a pre-quantized model's quantized layers into the layer table; change nothing."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    GIVES = frozenset({Fact.QDQ})

    @classmethod
    def check_model(cls, config, model: ir.Model) -> None:
        if not quantized_layers(model):
            raise ModelError("the prequantized recipe takes a model that is already quantized (Q/DQ on its "
                             "weights), and this one has none",
                             hint="pick a quantizing recipe, e.g. --recipe w8a8 (see `qcompile recipes`)")

    def run(self, model: ir.Model) -> bool:
        for node in model.graph:
            if node.op_type in INTEGER_OPS:
                self.ctx.layers.set(LayerRecord(node.name or node.op_type, node.op_type, LayerStatus.QUANTIZED,
                                                label=f"pre-quantized {node.op_type}",
                                                weight_bytes=_integer_op_weight_bytes(node)))
                continue
            if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
                continue
            dq = _weight_dq(node)
            name = node.name or node.op_type
            if dq is None:
                self.ctx.layers.set(LayerRecord.float(name, node.op_type, "float in the input model"))
                continue
            scheme = Scheme("pre-quantized", weight_scheme(dq), activation_scheme(node))
            stored = dq.inputs[0].const_value
            self.ctx.layers.set(LayerRecord.quantized(
                name, node.op_type, scheme, input_tensor=node.inputs[0].name, output_tensor=node.outputs[0].name,
                weight_bytes=WeightBytes(float=4 * int(np.prod(stored.shape)), quantized=int(stored.nbytes))))
        records = list(self.ctx.layers)
        self.ctx.reports["adopt_qdq"] = {"quantized_layers": sum(1 for r in records if r.is_quantized),
                                         "float_layers": sum(1 for r in records if not r.is_quantized)}
        return False


def _integer_op_weight_bytes(node: ir.Node) -> WeightBytes | None:
    """The integer op's constant weight (the first constant integer input of rank >= 2): its
    bytes, and float32's for as many values (MatMulNBits packs K x N values: its K and N)."""
    for value in node.inputs:
        tensor = value.const_value if value is not None else None
        if tensor is None or tensor.shape is None or len(tensor.shape) < 2 or \
                tensor.dtype not in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4):
            continue
        values = int(np.prod(tensor.shape))
        if node.op_type == "MatMulNBits":
            values = node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0) or values
        return WeightBytes(float=4 * values, quantized=int(tensor.nbytes))
    return None
