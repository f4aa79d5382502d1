"""ascend_lower: the QDQ graph -> an ATC-ready ONNX graph for an Ascend SoC.

Steps (each reported in report.json under "ascend"):

1. The input shapes must be fixed (atc --input_shape); the QDQ graph is kept as the
   onnxruntime-runnable twin `model.qdq.onnx`.
2. Opset: a model above ATC's maximum (descriptor `opset.max`, 16) is converted down with
   onnx's version converter; ops born after it that the converter cannot take down
   (LayerNormalization, Gelu) are first decomposed into listed primitives.
3. Q/DQ pairs that only quantize a layer's output for onnxruntime's fusion are dropped: the
   next layer quantizes from the float AscendDequant output with its own AscendQuant.
4. The rewrite rules of `rules.py`: Conv/Gemm/MatMul(+bias) on DQ(Q(x)) and int8 weights ->
   AscendQuant -> int8 op -> AscendDequant; weight-only layers -> AscendAntiQuant.
5. What is left of QDQ is folded: remaining activation pairs dropped, weight/bias
   DequantizeLinear of layers that stayed float folded into float initializers. A quantized
   layer no rule lowered stays float, with its reason in report.json.
6. Operators outside ATC's ONNX list are reported (and warned about).
7. The reference lowering (`reference.py`) becomes `ctx.reference_model`, so verification
   runs the graph that ships; `atc.sh` and `model.qdq.onnx` go to OUT/.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.errors import ModelError, TargetError
from qcompile.facts import Fact
from qcompile.model_io import convert_opset, opset_of
from qcompile.output import script_writer
from qcompile.numerics import dequantize
from qcompile.registry import QPass, register_pass

from . import capabilities, emit, reference
from .decompose import DECOMPOSED_OPS, decomposition_rules
from .qdq_form import const
from .rules import LAYER_OPS, LOWERING_RULE_SETS, LoweringOptions, Refusals, annotate, lowered_as

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@register_pass("ascend_lower")
class AscendLower(QPass):
    """Lower QDQ to ATC's ONNX (AscendQuant/AscendDequant/AscendAntiQuant); emit atc.sh and model.qdq.onnx."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        # AscendQuant's rounding (Round = half to even, what QuantizeLinear does)
        round_mode: Literal["Round", "Floor", "Ceil", "Trunc"] = "Round"
        # write OUT/model.qdq.onnx, the QDQ graph onnxruntime runs (AMCT's fake-quant twin)
        qdq_twin: bool = True
        # write OUT/atc.sh
        atc_script: bool = True

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        ctx, tgt, cfg = self.ctx, self.ctx.target, self.config
        soc = capabilities.soc_version(tgt)
        compute_dtype = str(tgt.setting("quant_compute_dtype", "float16"))
        info: dict = {"soc_version": soc, "round_mode": cfg.round_mode, "quant_compute_dtype": compute_dtype}

        input_shape = emit.input_shape_arg(model)  # refuses dynamic dims before any rewriting
        info["opset"] = {"before": opset_of(model)}
        info["decomposed"] = self._to_atc_opset(model)
        info["opset"]["after"] = opset_of(model)

        if cfg.qdq_twin:
            ctx.outputs.artifacts["model.qdq.onnx"] = emit.model_writer(model.clone())

        graph = model.graph
        annotate(graph, ctx.layers, LoweringOptions(cfg.round_mode, compute_dtype))
        info["output_qdq_pairs_dropped"] = _drop_qdq_pairs(graph, keep_layer_inputs=True)
        common_passes.RemoveUnusedNodesPass()(model)  # the dropped pairs' QuantizeLinear still read the tensors
        fired = sum(rules.apply_to_model(model) for rules in LOWERING_RULE_SETS)
        refused = Refusals.of(model)   # why each layer the rules could not lower stays float
        made = {n.name: lowered_as(n) for n in graph if lowered_as(n) is not None}
        common_passes.RemoveUnusedNodesPass()(model)
        info["activation_qdq_pairs_dropped"] = _drop_qdq_pairs(graph, keep_layer_inputs=False)
        info["dequantize_folded"] = _fold_constant_dequantize(graph)
        common_passes.RemoveUnusedNodesPass()(model)
        left = [n.name for n in graph if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx")]
        if left:  # every Q/DQ is either lowered, dropped or folded: anything else is a bug
            raise RuntimeError(f"ascend_lower left QuantizeLinear/DequantizeLinear nodes: {left[:5]}")
        graph.sort()
        common_passes.NameFixPass()(model)

        lowered, kept_float, features = self._update_layers(made, refused)
        info["layers_lowered"] = lowered
        info["layers_kept_float"] = kept_float
        info["rewrites"] = int(fired or 0)
        counts = collections.Counter(n.op_type for n in graph if n.op_type.startswith("Ascend"))
        info["ascend_ops"] = dict(sorted(counts.items()))
        outside = capabilities.ops_outside_atc(model, tgt)
        info["ops_outside_atc_list"] = outside
        if outside:
            ctx.warn(f"{tgt.name}: operators outside ATC's ONNX list ({tgt.raw.get('atc_ops')}) remain: "
                     + ", ".join(f"{k} x{v}" for k, v in outside.items())
                     + "; ATC would run them on the AI CPU or refuse them")
        for message in capabilities.unconfirmed_in_use(tgt, features):
            ctx.warn(message)

        ctx.outputs.reference_model = reference.reference_model(model, compute_dtype)
        info["verified_through"] = "reference lowering (reference.py): AscendQuant/AscendDequant/AscendAntiQuant " \
                                   "as standard ONNX, int8 layers as ConvInteger/MatMulInteger"
        flags, sparse_notes = capabilities.sparsity_flags(tgt, ctx.sparse.patterns())
        for note in sparse_notes:
            if note.startswith("unstructured"):
                ctx.warn(f"{tgt.name}: {note}")
        if flags:
            info["atc_flags"] = flags
        if cfg.atc_script:
            notes = []
            if outside:
                notes.append("operators outside ATC's ONNX list: " + ", ".join(outside))
            notes += sparse_notes
            script = emit.atc_script(soc_version=soc, target=tgt.name + (f":{tgt.variant}" if tgt.variant else ""),
                                     input_shape=input_shape, opset=opset_of(model), notes=notes, flags=flags)
            ctx.outputs.artifacts["atc.sh"] = script_writer(script)
            info["atc_command"] = script.strip().splitlines()[-1]
        info["input_shape"] = input_shape
        ctx.reports["ascend"] = info
        return True

    # -- opset ------------------------------------------------------------------------------
    def _to_atc_opset(self, model: ir.Model) -> dict[str, int]:
        """Convert down to the descriptor's opset.max (onnx's version converter, never relabelled)."""
        tgt = self.ctx.target
        top = tgt.raw.get("opset", {}).get("max")
        current = opset_of(model)
        if top is None or current <= int(top):
            return {}
        top = int(top)
        rules = decomposition_rules(top)
        before = collections.Counter(n.op_type for n in model.graph)
        if rules is not None:
            rules.apply_to_model(model)
            common_passes.RemoveUnusedNodesPass()(model)
        after = collections.Counter(n.op_type for n in model.graph)
        decomposed = {op: before[op] - after[op] for op in DECOMPOSED_OPS if before[op] > after[op]}
        try:
            converted = convert_opset(model, top)
        except ModelError as err:
            raise TargetError(f"{tgt.name}: ATC parses ONNX opsets up to {top} (AscendQuant/AscendDequant are "
                              f"registered for opsets 8..{top}); the model is at opset {current} and "
                              f"{str(err)[0].lower() + str(err)[1:]}",
                              hint=f"re-export the model at opset <= {top}") from None
        model.graph = converted.graph  # in place: the pipeline keeps this model object
        return decomposed

    # -- report -----------------------------------------------------------------------------
    def _update_layers(self, made: dict[str, dict], refused: dict[str, str]) -> tuple[int, int, list[str]]:
        """Each quantized layer: what the rules lowered it to, or float with the refusing reason."""
        lowered = kept = 0
        features: list[str] = []
        for record in self.ctx.layers.quantized():
            name = record.name
            done = made.get(name)
            if done is not None:
                record.lowering["ascend"] = {("lowered_to" if k == "ascend" else k): v for k, v in done.items()
                                             if k != "output_tensor" and v is not None}
                if done.get("output_tensor"):
                    record.output_tensor = done["output_tensor"]
                features.append("weight_only_int8" if record.weight_only else "int8")
                lowered += 1
                continue
            reason = refused.get(name) or "; ".join(record.notes) or "no Ascend lowering rule matched its QDQ form"
            self.ctx.layers.fall_back(name, f"ascend_lower: {reason}")
            kept += 1
        if kept:
            self.ctx.warn(f"{kept} layers the quantize pass quantized stay float on {self.ctx.target.name} "
                          "(see report.json layers: reason)")
        return lowered, kept, features


# -- QDQ clean-up -----------------------------------------------------------------------------
def _same_qparams(q: ir.Node, dq: ir.Node) -> bool:
    return (len(q.inputs) >= 2 and len(dq.inputs) >= 2 and q.inputs[1] is dq.inputs[1]
            and (q.inputs[2] if len(q.inputs) > 2 else None) is (dq.inputs[2] if len(dq.inputs) > 2 else None))


def _feeds_layer(value: ir.Value) -> bool:
    return any(user.op_type in LAYER_OPS and (index == 0 or (user.op_type == "MatMul" and index == 1))
               for user, index in value.uses())


def _bypass(graph: ir.Graph, dq_out: ir.Value, x: ir.Value) -> None:
    """Consumers of dq_out read x instead; a graph output keeps its name."""
    slots = [i for i, out in enumerate(graph.outputs) if out is dq_out]
    if slots:
        name = dq_out.name
        target = x
        if x.is_graph_input() or x in graph.outputs or x.is_initializer():
            ident = ir.node("Identity", [x], name=f"{name}_Identity")
            graph.append(ident)
            target = ident.outputs[0]
            target.dtype, target.shape = x.dtype, x.shape
        dq_out.name = f"{name}_removed"
        for i in slots:
            graph.outputs[i] = target
        target.name = name
    dq_out.replace_all_uses_with(x)


def _drop_qdq_pairs(graph: ir.Graph, *, keep_layer_inputs: bool) -> int:
    """Remove QuantizeLinear->DequantizeLinear pairs on float activations (consumers read the
    float tensor). With keep_layer_inputs, a DQ feeding a Conv/Gemm/MatMul data input stays.
    A pair whose zero point is its type's minimum clamps negatives to 0: it carries a ReLU that
    was folded into it (a pre-quantized model's uint8 after ReLU, int8 with zero point -128),
    so a Relu takes its place."""
    dropped = 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]:
        x = q.inputs[0]
        if x is None or x.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        replacement = None
        for user, _ in list(q.outputs[0].uses()):
            if user.op_type != "DequantizeLinear" or not _same_qparams(q, user):
                continue
            out = user.outputs[0]
            if keep_layer_inputs and _feeds_layer(out):
                continue
            if replacement is None:
                replacement = _relu_after(graph, q, x) if _clamps_at_zero(q) else x
            _bypass(graph, out, replacement)
            dropped += 1
    return dropped


def _clamps_at_zero(q: ir.Node) -> bool:
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    z = const(zp) if zp is not None else None
    if z is None or z.size != 1:
        return False
    info = np.iinfo(z.dtype) if np.issubdtype(z.dtype, np.integer) else None
    return info is not None and int(z.reshape(())) == info.min


def _relu_after(graph: ir.Graph, q: ir.Node, x: ir.Value) -> ir.Value:
    relu = ir.node("Relu", [x], name=f"{x.name}_Relu_of_dropped_qdq")
    out = relu.outputs[0]
    out.name, out.dtype, out.shape = f"{x.name}_relu", x.dtype, x.shape
    graph.insert_after(q, relu)
    return out


def _fold_constant_dequantize(graph: ir.Graph) -> int:
    """DequantizeLinear of constants (weights/biases of layers that stay float) -> float initializers."""
    folded = 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        q, s = const(dq.inputs[0]), const(dq.inputs[1])
        z = const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), np.int8)
        if q is None or s is None or z is None:
            continue
        axis = dq.attributes.get_int("axis", 1) if s.size > 1 else None
        values = dequantize(q, s, z, axis=None if axis is None else axis % q.ndim).astype(np.float32)
        out = dq.outputs[0]
        name = out.name
        out.name = f"{name}_removed"
        init = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(values, name=name))
        graph.register_initializer(init)
        out.replace_all_uses_with(init)
        folded += 1
    return folded
