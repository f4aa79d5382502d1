"""Residual add + LayerNorm/RMSNorm: `fuse`'s com.microsoft SkipLayerNormalization and
SkipSimplifiedLayerNormalization, as a generated kernel.

Not a quantized op: onnxruntime has both, but runs them with a scalar loop and a division per
element (MiniLM's [16, 64, 384]: 1.9 ms, against 0.16 ms for Add + LayerNormalization, which its
optimizer fuses into the slow op at load anyway). Twelve of them cost MiniLM more at batch 16
than its six attentions. Because serving them makes a model need the kernel library, the
lowering is a companion (`generate_kernels.norms`): by default it runs only where a compile
ships a library for its quantized ops anyway.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.kernelgen import DOMAIN, KernelSpec
from qcompile.qdq import add_initializer, take_over

from .kernel_match import const

OP = "SkipLayerNorm"
_FORMS = {"SkipLayerNormalization": "layer_norm", "SkipSimplifiedLayerNormalization": "rms"}
_DEFAULT_EPSILON = 1e-12   # both contrib ops' schema default


@dataclasses.dataclass
class SkipNorm:
    layer: str                # the node's name
    node: ir.Node
    norm: str                 # layer_norm | rms
    hidden: int
    gamma: ir.Value
    beta: ir.Value | None
    bias: ir.Value | None
    epsilon: float


def _vector(value: ir.Value | None, hidden: int) -> bool:
    array = const(value)
    return array is not None and array.dtype == np.float32 and array.shape == (hidden,)


def match_skip_norm(node: ir.Node) -> SkipNorm | None:
    """A com.microsoft Skip(Simplified)LayerNormalization the kernel serves: float32, constant
    gamma/beta/bias over the last dimension, and nobody reading its mean or inverse-std outputs."""
    norm = _FORMS.get(node.op_type)
    if norm is None or node.domain != "com.microsoft" or len(node.inputs) < 3:
        return None
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, skip, gamma = inputs[:3]
    beta, bias = (inputs[3], inputs[4]) if norm == "layer_norm" else (None, inputs[3])
    gamma_array = const(gamma)
    if x is None or skip is None or gamma_array is None or gamma_array.ndim != 1:
        return None
    hidden = int(gamma_array.shape[0])
    if gamma_array.dtype != np.float32 or any(v is not None and not _vector(v, hidden) for v in (beta, bias)):
        return None
    if x.dtype not in (None, ir.DataType.FLOAT) or skip.dtype not in (None, ir.DataType.FLOAT):
        return None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:3]):
        return None
    epsilon = node.attributes.get_float("epsilon", _DEFAULT_EPSILON)
    return SkipNorm(node.name, node, norm, hidden, gamma, beta, bias, epsilon)


def skip_norm_spec(match: SkipNorm, isa: str, family: str) -> KernelSpec:
    return KernelSpec(op=OP, family=family, isa=isa, dtypes=(("activation", "float32"),),
                      static_dims=(("H", match.hidden),), dynamic_dims=("rows",), epilogue=match.norm)


def skip_norm_to_generated(graph: ir.Graph, match: SkipNorm, spec: KernelSpec) -> ir.Value:
    """Replace the node by one com.qcompile.SkipLayerNorm (a missing beta or bias as zeros)."""
    node, base = match.node, match.layer
    zeros = np.zeros(match.hidden, np.float32)
    beta = match.beta if match.beta is not None else add_initializer(graph, f"{base}_beta", zeros)
    bias = match.bias if match.bias is not None else add_initializer(graph, f"{base}_bias", zeros)
    total = node.outputs[3] if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()) \
        else None
    new = ir.node(OP, [node.inputs[0], node.inputs[1], match.gamma, beta, bias],
                  {"spec": spec.id, "epsilon": float(match.epsilon)}, domain=DOMAIN, name=base,
                  num_outputs=2 if total is not None else 1)
    graph.insert_before(node, new)
    pairs = [(node.outputs[0], new.outputs[0])] + ([(total, new.outputs[1])] if total is not None else [])
    for old, value in pairs:
        value.dtype, value.shape = ir.DataType.FLOAT, old.shape
        take_over(graph, old, value, [])
    graph.remove(node, safe=True)
    return new.outputs[0]
