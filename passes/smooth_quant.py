"""smooth_quant: migrate activation outliers into the weights (SmoothQuant, Xiao et al. 2023).

For a group of linears (MatMul/Gemm with constant weights) reading one activation X, each
input channel j gets s_j = max|X_j|^α / max|W_j|^(1−α) (max over the group's weights, so
Q, K and V — or gate and up — share one s); X is divided by s and each weight's input row
j multiplied by it, which leaves X·W unchanged in float and flattens X's per-channel range
for per-tensor quantization.

Where the division goes, by subgraph kind (recipe `kinds`):

* `norm-linear`: X comes from LayerNormalization/RMSNorm with constant γ (and β): γ/s, β/s;
* `linear-linear`: X comes from a MatMul/Gemm with a constant weight (optionally + a
  constant bias): that weight's output columns and the bias are divided by s;
* `affine-linear` / `affine-conv`: X = y·a (+ b) with constant a (and b), one value or one per
  channel — a foldable Mul, such as the learnable affine after PP-LCNet's HardSwish — read by
  MatMul/Gemm or by Conv layers (X's channel axis 1; grouped and depthwise Convs scale each
  group's own input channels): a/s and b/s. For a depthwise Conv the per-channel weight
  scales absorb s exactly, so its input's channels can be brought to one range for free;
* otherwise, with `explicit_mul: true`, a Mul(X, 1/s) is inserted in front of the group only
  (the other consumers of X — e.g. a residual Add after a post-LN BERT LayerNorm, whose
  output also feeds the residual — keep X); without it the group is left alone and the
  report says why.

The per-channel |X| maxima come from one onnxruntime pass over the calibration data, which
also keeps a sample of rows; with `alpha_search`, each group takes the α whose simulated
int8 quantization error of X·W on those rows is lowest (and is left alone when no α beats
no smoothing). Run it before `calibrate`, so the ranges quantize uses are the smoothed ones.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.numerics import compute_qparams, dequantize, quantize, reduce_absmax
from qcompile.qdq import add_initializer, set_constant_input
from qcompile.registry import QPass, register_pass

from .calibrate import stream_tensors
from .channel_scales import (channel_shaped, input_channel_absmax, per_channel_shape, scale_input_channels,
                             times_channels)
from .conv_patches import ConvGeometry, sampled_patches
from .scope import in_scope

_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
_EPS = 1e-5


@dataclasses.dataclass
class Linear:
    node: ir.Node
    weight: ir.Value
    k_axis: int           # the weight axis indexed by X's channels
    conv: ConvGeometry | None = None    # Conv consumers: X is NCHW, the weight [Cout, Cin/g, kh, kw]

    @property
    def groups(self) -> int | None:
        """The Conv's groups (None for MatMul/Gemm), as channel_scales takes them."""
        return self.conv.groups if self.conv is not None else None


@dataclasses.dataclass
class Group:
    x: ir.Value
    linears: list[Linear]
    kind: str | None = None      # norm-linear | linear-linear | explicit-mul, None: cannot fold
    reason: str = ""
    producer: ir.Node | None = None
    bias_add: ir.Node | None = None

    @property
    def convs(self) -> bool:
        return self.linears[0].conv is not None

    @property
    def channel_axis(self) -> int:
        return 1 if self.convs else -1


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


@register_pass("smooth_quant")
class SmoothQuant(QPass):
    """SmoothQuant: per-channel scales moving activation outliers into the weights, folded into producers."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        alpha: float = 0.5
        # candidate alphas; each group takes the one with the lowest simulated int8 error
        alpha_search: tuple[float, ...] = ()
        kinds: tuple[Literal["norm-linear", "linear-linear", "affine-linear", "affine-conv"], ...] = \
            ("norm-linear", "linear-linear")
        explicit_mul: bool = False    # insert Mul(X, 1/s) where no producer can absorb the scale
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 64             # calibration samples for the channel maxima
        rows: int = 2048              # rows of X kept per group for the alpha search

        def validate(self):
            for key, values in (("alpha", (self.alpha,)), ("alpha_search", self.alpha_search)):
                bad = [a for a in values if not 0.0 < a < 1.0]
                if bad:
                    return key, f"alpha must be in (0, 1), got {bad[0]}"
            if self.samples < 1:
                return "samples", "must be at least 1"
            if self.rows < 16:
                return "rows", "must be at least 16"
            return None

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"smoothed"}

    # -- finding groups --------------------------------------------------------------
    @classmethod
    def groups(cls, model: ir.Model, config) -> list[Group]:
        by_x: dict[str, Group] = {}
        convs = "affine-conv" in config.kinds
        for node in model.graph:
            lin = _linear(node, convs=convs)
            if lin is None or not in_scope(node.name, config):
                continue
            x = node.inputs[0]
            if x is None or x.const_value is not None:
                continue
            by_x.setdefault(x.name, Group(x, [])).linears.append(lin)
        outputs = set(model.graph.outputs)
        for group in by_x.values():
            if len({lin.conv is None for lin in group.linears}) > 1:
                group.reason = "read by both Conv and MatMul/Gemm layers"
                continue
            _classify(group, config, outputs)
        return list(by_x.values())

    # -- running -----------------------------------------------------------------------
    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        groups = self.groups(model, cfg)
        usable = [g for g in groups if g.kind is not None]
        records = {g.x.name: {"linears": [lin.node.name for lin in g.linears], "kind": g.kind,
                              "status": "skipped", "reason": g.reason} for g in groups}
        if not usable:
            ctx.report["smooth_quant"] = {"groups": records, "smoothed": 0}
            return False
        conv_inputs = {g.x.name: [lin.conv for lin in g.linears] for g in usable if g.convs}
        ranges, rows = channel_stats(model, [g.x for g in usable], ctx, samples=cfg.samples, rows=cfg.rows,
                                     label="smooth_quant", conv_inputs=conv_inputs)
        act_dtype = str(ctx.target.setting("activation_dtype", "int8")) if ctx.target is not None else "int8"
        act_symmetric = bool(ctx.target.setting("activation_symmetric", True)) if ctx.target is not None else True
        per_tensor_ops = set(ctx.target.setting("per_tensor_weight_ops") or ()) if ctx.target is not None else set()
        changed = 0
        for g in usable:
            rec = records[g.x.name]
            xlo, xhi = ranges[g.x.name]
            amax = np.maximum(-xlo, xhi)
            weights = [lin.weight.const_value.numpy().astype(np.float32) for lin in g.linears]
            wmaxes = [input_channel_absmax(w, lin.k_axis, lin.groups) for w, lin in zip(weights, g.linears)]
            if len({m.shape for m in wmaxes}) > 1:
                rec["reason"] = "the layers reading X disagree on its channel count"
                continue
            wmax = np.max(wmaxes, axis=0)
            if amax.shape != wmax.shape:
                rec["reason"] = f"channel count of X ({amax.size}) differs from the weights' ({wmax.size})"
                continue
            alphas = cfg.alpha_search or (cfg.alpha,)
            sample = rows[g.x.name]
            per_tensor = [lin.node.op_type in per_tensor_ops for lin in g.linears]
            sim = _simulated_conv_error if g.convs else _simulated_error
            simulate = lambda scales: sim(sample, (xlo, xhi), weights, g.linears, scales,  # noqa: E731
                                          act_dtype, act_symmetric, per_tensor)
            errors = {a: simulate(_scales(amax, wmax, a)) for a in alphas}
            baseline = simulate(np.ones_like(amax))
            alpha = min(errors, key=errors.get)
            rec.update({"error_before": round(baseline, 6), "error_after": round(errors[alpha], 6)})
            if cfg.alpha_search and errors[alpha] >= baseline:
                rec["reason"] = "no alpha lowers the simulated int8 error"
                continue
            s = _scales(amax, wmax, alpha)
            for w, lin in zip(weights, g.linears):
                set_constant_input(model.graph, lin.node, 1, scale_input_channels(w, s, lin.k_axis, lin.groups).astype(np.float32))
            _fold_division(model.graph, g, s)
            if g.kind != "explicit-mul":
                ctx.note_rescaled(g.x.name, g.channel_axis, s)
            rec.update({"status": "smoothed", "alpha": alpha, "reason": "",
                        "max_channel_ratio": round(float(amax.max() / max(np.median(amax), 1e-12)), 2)})
            changed += 1
        ctx.report["smooth_quant"] = {"groups": records, "smoothed": changed,
                                      "alpha": cfg.alpha if not cfg.alpha_search else list(cfg.alpha_search)}
        return bool(changed)


def channel_stats(model: ir.Model, xs: list[ir.Value], ctx, *, samples: int, rows: int, label: str,
                  conv_inputs: dict[str, list[ConvGeometry]] | None = None):
    """Per-channel (min, max) of each X (last axis) over the calibration data, and a random
    sample of up to `rows` of its rows (for searches that simulate X·W). An X named in
    `conv_inputs` is NCHW (channels on axis 1) and its sample is, per Conv reading it, that
    Conv's input patches [rows, groups, Cin/g·kh·kw] at sampled output positions."""
    conv_inputs = conv_inputs or {}
    dataset = ctx.calib
    if dataset is None:
        dataset = open_dataset(None, model_input_specs(model), synthetic_samples=8)
        ctx.warn(f"{label} without calibration data: channel statistics from synthetic inputs")
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {x.name: [] for x in xs}
    count = dict.fromkeys(kept, 0)
    rng = np.random.default_rng(0)
    per_batch_rows = max(16, rows // max(min(samples, dataset.num_samples), 1))
    for arrays, _ in stream_tensors(model, xs, dataset, samples=samples, label=label, progress=ctx.progress):
        for name, array in arrays.items():
            geos = conv_inputs.get(name)
            array = np.asarray(array, dtype=np.float32)
            channel = 1 if geos else array.ndim - 1
            others = tuple(i for i in range(array.ndim) if i != channel)
            mn, mx = array.min(axis=others), array.max(axis=others)
            lo[name] = mn if name not in lo else np.minimum(lo[name], mn)
            hi[name] = mx if name not in hi else np.maximum(hi[name], mx)
            if count[name] >= rows:
                continue
            if geos:
                positions = max(1, min(per_batch_rows, rows - count[name]) // array.shape[0])
                patches = [sampled_patches(array, geo, max_positions=positions, rng=rng) for geo in geos]
                kept[name].append(patches)
                count[name] += patches[0].shape[0]
            else:
                flat = array.reshape(-1, array.shape[-1])
                take = rng.choice(flat.shape[0], min(per_batch_rows, flat.shape[0], rows - count[name]), replace=False)
                kept[name].append(flat[take])
                count[name] += len(take)
    samples_kept = {n: ([np.concatenate(per) for per in zip(*r)] if n in conv_inputs else np.concatenate(r))
                    for n, r in kept.items()}
    return {n: (lo[n], hi[n]) for n in kept}, samples_kept


# -- helpers --------------------------------------------------------------------------------
def _linear(node: ir.Node, convs: bool = False) -> Linear | None:
    """A MatMul/Gemm whose input 1 is a constant 2-D weight, with the axis X's channels index;
    with `convs`, also a 2-D Conv with a constant weight."""
    ops = ("MatMul", "Gemm", "Conv") if convs else ("MatMul", "Gemm")
    if node.domain not in ("", "ai.onnx") or node.op_type not in ops or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if node.op_type == "Conv":
        geo = ConvGeometry.of(node, w.const_value.shape) if w is not None and w.const_value is not None else None
        return Linear(node, w, 1, geo) if geo is not None else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return Linear(node, w, 1 if node.attributes.get_int("transB", 0) else 0)
    return Linear(node, w, 0)


def _only_group_uses(x: ir.Value, group: Group, outputs: set) -> bool:
    members = {id(lin.node) for lin in group.linears}
    return x not in outputs and all(id(u.node) in members and u.idx == 0 for u in x.uses())


def _classify(group: Group, config, outputs: set) -> None:
    x = group.x
    producer = x.producer()
    exclusive = _only_group_uses(x, group, outputs)
    if producer is not None and producer.op_type in _NORMS and "norm-linear" in config.kinds and not group.convs:
        gamma = producer.inputs[1] if len(producer.inputs) > 1 else None
        if exclusive and _const(gamma) is not None and producer.attributes.get_int("axis", -1) in (-1, len(x.shape or ()) - 1):
            group.kind, group.producer = "norm-linear", producer
            return
        why = "the norm's output also feeds other nodes" if not exclusive else "the norm's scale is not constant"
    elif producer is not None and "linear-linear" in config.kinds and not group.convs and \
            _linear_producer(group, producer):
        if exclusive:
            group.kind = "linear-linear"
            return
        why = "the producing linear's output also feeds other nodes"
    elif producer is not None and _affine_producer(group, producer, x):
        kind = "affine-conv" if group.convs else "affine-linear"
        if exclusive and kind in config.kinds:
            group.kind = kind
            return
        why = "the affine's output also feeds other nodes" if not exclusive else f"kind {kind!r} is not in kinds"
    else:
        why = f"produced by {producer.op_type if producer is not None else 'a graph input'}, which cannot absorb a scale"
    if config.explicit_mul:
        group.kind, group.reason = "explicit-mul", why
    else:
        group.reason = why + " (explicit_mul: true would insert a Mul)"


def _linear_producer(group: Group, producer: ir.Node) -> bool:
    """X = MatMul/Gemm(const W) or Add(MatMul(const W), const bias) with a single use."""
    bias_add = None
    if producer.op_type == "Add":
        a, b = producer.inputs
        inner = a.producer() if a is not None and _const(b) is not None else None
        if inner is None or len(a.uses()) != 1:
            return False
        bias_add, producer = producer, inner
    lin = _linear(producer)
    if lin is None:
        return False
    group.producer, group.bias_add = producer, bias_add
    return True


def _affine_producer(group: Group, producer: ir.Node, x: ir.Value) -> bool:
    """X = Mul(y, a) or Add(Mul(y, a), b), a and b constants of one value or one per channel of X
    (they must stay that size once divided by a per-channel s); the Mul's output used once."""
    bias_add, mul = None, producer
    if producer.op_type == "Add":
        a, b = producer.inputs
        const_idx = 1 if _const(b) is not None else 0 if _const(a) is not None else None
        if const_idx is None:
            return False
        inner = producer.inputs[1 - const_idx]
        mul = inner.producer()
        if mul is None or len(inner.uses()) != 1:
            return False
        bias_add = producer
    if mul.op_type != "Mul" or sum(_const(v) is not None for v in mul.inputs) != 1:
        return False
    rank = len(x.shape) if x.shape is not None else None
    if rank is None:
        return False
    consts = [_const(v) for v in list(mul.inputs) + (list(bias_add.inputs) if bias_add else [])]
    if not all(per_channel_shape(c, rank, group.channel_axis) for c in consts if c is not None):
        return False
    group.producer, group.bias_add = mul, bias_add
    return True


def _scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(amax, _EPS), alpha) / np.power(np.maximum(wmax, _EPS), 1.0 - alpha)
    s = np.where((amax > 0) & (wmax > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _simulated_error(x: np.ndarray, x_range, weights, linears, s: np.ndarray, act_dtype: str,
                     act_symmetric: bool, per_tensor: list[bool] | None = None) -> float:
    """Mean over the group's linears of the relative squared error of X·W with X/s quantized
    per tensor as the target will (its activation dtype and symmetry: an asymmetric uint8
    range fits a GELU output's short negative tail, a symmetric one does not) and W·s in
    int8 per output channel, or per tensor where the target quantizes that op's weights so
    (`per_tensor_weight_ops`, Ascend's MatMul: the outliers SmoothQuant moves into W then
    cost every output channel). X/s's range comes from the full-data channel extremes, not
    just the sampled rows: the outlier tokens that set it are rare."""
    xs = x / s
    lo, hi = float(np.min(x_range[0] / s)), float(np.max(x_range[1] / s))
    xscale, xzp = compute_qparams(lo, hi, act_dtype, symmetric=act_symmetric)
    xq = dequantize(quantize(xs, xscale, xzp, act_dtype), xscale, xzp)
    errors = []
    for i, (w, lin) in enumerate(zip(weights, linears)):
        w2 = w if lin.k_axis == 0 else w.T                    # [K, N]
        ws = w2 * s[:, None]
        axis = None if per_tensor and per_tensor[i] else 1
        lo_w, hi_w = reduce_absmax(ws, axis)
        wscale, wzp = compute_qparams(lo_w, hi_w, "int8", symmetric=True, restricted=True)
        wq = dequantize(quantize(ws, wscale, wzp, "int8", axis=axis), wscale, wzp, axis=axis)
        ref = x.astype(np.float64) @ w2
        err = ref - xq.astype(np.float64) @ wq
        den = float(np.sum(ref * ref))
        errors.append(float(np.sum(err * err)) / den if den > 0 else 0.0)
    return float(np.mean(errors))


def _simulated_conv_error(patches: list[np.ndarray], x_range, weights, linears, s: np.ndarray, act_dtype: str,
                          act_symmetric: bool, per_tensor: list[bool] | None = None) -> float:
    """_simulated_error for Conv consumers: each Conv's sampled input patches [rows, G, K]
    (K = Cin/g·kh·kw, channel-major) stand for X; X/s quantized per tensor, W·s in int8 per
    output channel (or per tensor), the relative squared error of the Conv's outputs."""
    lo, hi = float(np.min(x_range[0] / s)), float(np.max(x_range[1] / s))
    xscale, xzp = compute_qparams(lo, hi, act_dtype, symmetric=act_symmetric)
    errors = []
    for i, (x, w, lin) in enumerate(zip(patches, weights, linears)):
        groups, taps = lin.conv.groups, int(np.prod(w.shape[2:]))
        s_cols = np.repeat(s.reshape(groups, -1), taps, axis=1)                    # [G, K]
        xs = x / s_cols
        xq = dequantize(quantize(xs, xscale, xzp, act_dtype), xscale, xzp)
        ws = scale_input_channels(w, s, 1, groups)
        axis = None if per_tensor and per_tensor[i] else 0
        lo_w, hi_w = reduce_absmax(ws, axis)
        wscale, wzp = compute_qparams(lo_w, hi_w, "int8", symmetric=True, restricted=True)
        wq = dequantize(quantize(ws, wscale, wzp, "int8", axis=axis), wscale, wzp, axis=axis)
        wg = w.reshape(groups, w.shape[0] // groups, -1).astype(np.float64)       # [G, Cout/g, K]
        wqg = wq.reshape(wg.shape).astype(np.float64)
        ref = np.einsum("pgk,gok->pgo", x, wg, optimize=True)
        err = ref - np.einsum("pgk,gok->pgo", xq.astype(np.float64), wqg, optimize=True)
        den = float(np.sum(ref * ref))
        errors.append(float(np.sum(err * err)) / den if den > 0 else 0.0)
    return float(np.mean(errors))


def _fold_division(graph: ir.Graph, g: Group, s: np.ndarray) -> None:
    """Divide X by s where the group's kind says: the norm's γ/β, the producer's weight/bias, the
    affine's a/b, or a Mul."""
    if g.kind == "norm-linear":
        for idx in (1, 2):
            v = g.producer.inputs[idx] if len(g.producer.inputs) > idx else None
            arr = _const(v)
            if arr is not None:
                set_constant_input(graph, g.producer, idx, (arr / s).astype(arr.dtype))
        return
    if g.kind in ("affine-linear", "affine-conv"):
        rank = len(g.x.shape)
        s_shaped = channel_shaped(s, rank, g.channel_axis)
        for node in (g.producer, g.bias_add):
            if node is None:
                continue
            idx = 1 if _const(node.inputs[1]) is not None else 0
            set_constant_input(graph, node, idx, times_channels(_const(node.inputs[idx]), 1.0 / s_shaped, rank))
        return
    if g.kind == "linear-linear":
        lin = _linear(g.producer)
        w = lin.weight.const_value.numpy().astype(np.float32)
        out_axis = 1 - lin.k_axis  # the producer's output channels
        shape = [1, 1]
        shape[out_axis] = -1
        set_constant_input(graph, g.producer, 1, (w / s.reshape(shape)).astype(np.float32))
        if g.producer.op_type == "Gemm" and len(g.producer.inputs) > 2 and _const(g.producer.inputs[2]) is not None:
            b = _const(g.producer.inputs[2])
            set_constant_input(graph, g.producer, 2, (b / s).astype(b.dtype))
        if g.bias_add is not None:
            idx = 1 if _const(g.bias_add.inputs[1]) is not None else 0
            b = _const(g.bias_add.inputs[idx])
            set_constant_input(graph, g.bias_add, idx, (b / s).astype(b.dtype))
        return
    rank = len(g.x.shape) if g.x.shape is not None else (4 if g.convs else 1)
    inv = add_initializer(graph, f"{g.x.name}_smooth_inv_scale",
                          channel_shaped((1.0 / s).astype(np.float32), rank, g.channel_axis))
    mul = ir.node("Mul", [g.x, inv], name=f"{g.linears[0].node.name}_smooth/Mul")
    mul.outputs[0].name = f"{g.x.name}_smoothed"
    mul.outputs[0].dtype, mul.outputs[0].shape = g.x.dtype, g.x.shape
    graph.insert_after(g.x.producer(), mul) if g.x.producer() is not None else graph.insert_before(
        g.linears[0].node, mul)
    for lin in g.linears:
        lin.node.replace_input_with(0, mul.outputs[0])
