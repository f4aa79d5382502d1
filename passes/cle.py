"""cle: cross-layer equalization (Nagel et al. 2019, data-free quantization) for Conv → ReLU → Conv.

ReLU is positively homogeneous (relu(x/s) = relu(x)/s for s > 0), so output channel i of the
first Conv can be divided by s_i (weights and bias) and input channel i of the second Conv
multiplied by s_i without changing the float model. With r1_i = max|W1[i]| and r2_i =
max|W2[:, i]|, s_i = sqrt(r1_i / r2_i) makes both ranges sqrt(r1_i·r2_i): per-tensor weight
quantization (and per-tensor quantization of the activation in between) stops being ruled by
one channel. Chains are equalized pairwise, `iterations` sweeps. ReLU6/Clip, HardSwish and any
other activation break the identity; such pairs are reported and left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.registry import QPass, register_pass

from .equalization.channels import input_channel_absmax
from .equalization.conv_channels import divide_output_channels, multiply_input_channels


@dataclasses.dataclass
class Pair:
    first: ir.Node
    second: ir.Node
    between: ir.Node | None   # the Relu (None: the Convs are directly connected)


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _single_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0].node if len(uses) == 1 else None


@register_pass("cle")
class CrossLayerEqualization(QPass):
    """Cross-layer equalization of Conv → ReLU → Conv weight ranges (float-exact)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        iterations: int = 4

        def validate(self):
            return at_least(self, iterations=1)

    GIVES = frozenset({Fact.EQUALIZED})
    INVALIDATES = FLOAT_MODEL_CHANGED

    @staticmethod
    def pairs(model: ir.Model) -> tuple[list[Pair], dict[str, str]]:
        pairs, skipped = [], {}
        outputs = set(model.graph.outputs)
        for node in model.graph:
            if node.op_type != "Conv" or _const(node.inputs[1]) is None or node.outputs[0] in outputs:
                continue
            user = _single_user(node.outputs[0])
            between = None
            if user is not None and user.op_type == "Relu" and user.outputs[0] not in outputs:
                between, user = user, _single_user(user.outputs[0])
            if user is None or user.op_type != "Conv" or _const(user.inputs[1]) is None:
                if user is not None and user.op_type in ("Clip", "HardSwish", "HardSigmoid", "Mul", "Sigmoid"):
                    skipped[node.name] = f"followed by {user.op_type}, which is not positively homogeneous"
                continue
            if user.inputs[0] is not (between.outputs[0] if between else node.outputs[0]):
                continue
            pairs.append(Pair(node, user, between))
        return pairs, skipped

    def run(self, model: ir.Model) -> bool:
        pairs, skipped = self.pairs(model)
        ranges = {}
        for _ in range(self.config.iterations):
            for pair in pairs:
                ranges[pair.first.name] = self._equalize(model.graph, pair)
        self.ctx.reports["cle"] = {"pairs": [[p.first.name, p.second.name] for p in pairs], "skipped": skipped,
                                  "max_range_ratio_after": {k: round(v, 3) for k, v in ranges.items()}}
        return bool(pairs)

    @staticmethod
    def _equalize(graph: ir.Graph, pair: Pair) -> float:
        """One pairwise step; returns max/min of the equalized channel ranges afterwards."""
        w1 = _const(pair.first.inputs[1]).astype(np.float64)
        w2 = _const(pair.second.inputs[1]).astype(np.float64)
        c = w1.shape[0]
        g2 = pair.second.attributes.get_int("group", 1)
        regular = g2 == 1 and w2.shape[1] == c
        depthwise = g2 == c and w2.shape[0] == c and w2.shape[1] == 1
        if not (regular or depthwise) or w2.ndim != 4:
            return float("nan")
        r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
        r2 = input_channel_absmax(w2, 1, g2)
        ok = (r1 > 0) & (r2 > 0)
        s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
        divide_output_channels(graph, pair.first, s)
        multiply_input_channels(graph, pair.second, s)
        after = r1[ok] / s[ok]
        return float(after.max() / after.min()) if after.size else float("nan")
