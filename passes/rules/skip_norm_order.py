"""SkipLayerNormalization's full-size operand first.

onnxruntime's SkipLayerNormalization (and SkipSimplifiedLayerNormalization) computes
`input + skip` but sizes its output after `input`: `skip` may be broadcast ([1, seq, hidden]
or [seq, hidden]), `input` may not. onnxscript's skip-norm rules match the Add either way
round, so a BERT embedding sum `Add(word + token_type, position)` whose position embedding
constant folding made a [1, seq, hidden] constant can come out as
SkipLayerNormalization(position, word + token_type): exact at batch 1 and wrong at any
other batch (onnxruntime then rejects the next MultiHeadAttention's bias: "attention_bias
dimension 0 should be batch_size or 1"). The sum is commutative, so swapping the two
operands is always exact.
"""

from __future__ import annotations

import onnx_ir as ir

_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def _broadcast(value: ir.Value) -> bool | None:
    """True when `value` is (or may be) smaller than the batch, False when it is full, None unknown."""
    if value.const_value is not None:
        return True
    shape = value.shape
    if shape is None:
        return None
    if shape.rank() < 3:
        return True
    first = shape[0]
    return first == 1 if isinstance(first, int) else False


def full_input_first(graph: ir.Graph) -> int:
    """Swap input and skip where skip is the full tensor and input the broadcast one; how many."""
    swapped = 0
    for node in graph:
        if node.op_type not in _OPS or node.domain != "com.microsoft" or len(node.inputs) < 2:
            continue
        x, skip = node.inputs[0], node.inputs[1]
        if x is None or skip is None or _broadcast(x) is not True or _broadcast(skip) is not False:
            continue
        node.replace_input_with(0, skip)
        node.replace_input_with(1, x)
        swapped += 1
    return swapped
