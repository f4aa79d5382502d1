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
* `gated-linear`: X = a ⊙ L(z) (a gated MLP's down projection): L's output columns;
* with `center` on a target whose activations are symmetric (Ascend), an `affine-conv` group
  whose affine ends in an Add and whose Convs do not pad also has each channel shifted to the
  middle of its (smoothed) range: b − m, and every Conv's bias + Σ W·m. A one-signed channel
  (a HardSwish output runs from −0.375 up) otherwise leaves half of a symmetric int8 grid
  unused; asymmetric targets (cpu's uint8 with a zero point) lose nothing there and are left
  alone;
* otherwise, with `explicit_mul: true`, a Mul(X, 1/s) is inserted in front of the group only
  (the other consumers of X — e.g. a residual Add after a post-LN BERT LayerNorm, whose
  output also feeds the residual — keep X), except after an activation function, one op or
  spelled out in elementwise ops (a BERT FFN's output dense after GELU: measured to hurt;
  passes/equalization/groups.py `is_activation`); without
  it the group is left alone and the report says why.

The per-channel |X| maxima come from one onnxruntime pass over the calibration data, which
also keeps a sample of rows; with `alpha_search`, each group takes the α whose simulated
int8 quantization error of X·W on those rows is lowest (and is left alone when no α beats
no smoothing). Run it before `calibrate`, so the ranges quantize uses are the smoothed ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.numerics import compute_qparams, fake_quantize, reduce_absmax
from qcompile.qdq import set_constant_input
from qcompile.registry import QPass, register_pass
from qcompile.weight_store import derived_tensor

from .equalization.channels import channel_shaped, input_channel_absmax, scale_input_channels, times_channels
from .equalization.conv_channels import shift_conv_bias
from .equalization.groups import Group, find_groups, fold_division
from .equalization.stats import channel_stat_groups

_EPS = 1e-5


@register_pass("smooth_quant")
class SmoothQuant(QPass):
    """SmoothQuant: per-channel scales moving activation outliers into the weights, folded into producers."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        alpha: float = 0.5
        # candidate alphas; each group takes the one with the lowest simulated int8 error
        alpha_search: tuple[float, ...] = ()
        kinds: tuple[Literal["norm-linear", "linear-linear", "gated-linear", "affine-linear", "affine-conv"], ...] = \
            ("norm-linear", "linear-linear", "gated-linear")
        explicit_mul: bool = False    # insert Mul(X, 1/s) where no producer can absorb the scale
        # symmetric-activation targets: centre each channel of an affine-conv group's X (see above)
        center: bool = True
        # the activation granularity the later quantize step uses, which the alpha search
        # simulates: per_tensor (static, the target's dtype) or per_token (dynamic int8 rows)
        granularity: Literal["per_tensor", "per_token"] = "per_tensor"
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 64             # calibration samples for the channel maxima
        rows: int = 2048              # rows of X kept per group for the alpha search

        def validate(self):
            for key, values in (("alpha", (self.alpha,)), ("alpha_search", self.alpha_search)):
                bad = [a for a in values if not 0.0 < a < 1.0]
                if bad:
                    return key, f"alpha must be in (0, 1), got {bad[0]}"
            return at_least(self, samples=1, rows=16)

    GIVES = frozenset({Fact.SMOOTHED})
    INVALIDATES = FLOAT_MODEL_CHANGED

    @classmethod
    def groups(cls, model: ir.Model, config) -> list[Group]:
        return find_groups(model, config, mul_after_activation=False)

    # -- running -----------------------------------------------------------------------
    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        groups = self.groups(model, cfg)
        usable = [g for g in groups if g.kind is not None]
        records = {g.x.name: {"linears": [lin.node.name for lin in g.linears], "kind": g.kind,
                              "status": "skipped", "reason": g.reason} for g in groups}
        if not usable:
            ctx.reports["smooth_quant"] = {"groups": records, "smoothed": 0}
            return False
        conv_inputs = {g.x.name: [lin.conv for lin in g.linears] for g in usable if g.convs}
        changed = 0
        # statistics come all at once, or under --max-memory block by block: each block's groups
        # are smoothed (and their sampled rows dropped) as soon as their statistics are complete
        for ranges, rows in channel_stat_groups(model, [g.x for g in usable], ctx, samples=cfg.samples,
                                                rows=cfg.rows, label="smooth_quant", conv_inputs=conv_inputs):
            changed += self._smooth(model, [g for g in usable if g.x.name in ranges], ranges, rows, records)
        ctx.reports["smooth_quant"] = {"groups": records, "smoothed": changed,
                                      "alpha": cfg.alpha if not cfg.alpha_search else list(cfg.alpha_search)}
        return bool(changed)

    def _smooth(self, model: ir.Model, groups: list[Group], ranges: dict, rows: dict, records: dict) -> int:
        """Choose each group's α on its sampled rows and fold the scales in; the groups smoothed."""
        cfg, ctx = self.config, self.ctx
        act_dtype = str(ctx.target.setting("activation_dtype", "int8")) if ctx.target is not None else "int8"
        act_symmetric = bool(ctx.target.setting("activation_symmetric", True)) if ctx.target is not None else True
        per_tensor_ops = set(ctx.target.setting("per_tensor_weight_ops") or ()) if ctx.target is not None else set()
        changed = 0
        for g in groups:
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
            refs = _float_outputs(sample, weights, g.linears, conv=bool(g.convs))   # the same for every α
            simulate = lambda scales: sim(sample, (xlo, xhi), weights, g.linears, scales,  # noqa: E731
                                          act_dtype, act_symmetric, per_tensor,
                                          per_token=cfg.granularity == "per_token", refs=refs)
            errors = {a: simulate(_scales(amax, wmax, a)) for a in alphas}
            baseline = simulate(np.ones_like(amax))
            alpha = min(errors, key=errors.get)
            rec.update({"error_before": round(baseline, 6), "error_after": round(errors[alpha], 6)})
            centers = cfg.center and act_symmetric and _centerable(g)
            if cfg.alpha_search and errors[alpha] >= baseline:
                if centers:
                    changed += self._center(model.graph, g, xlo, xhi, np.ones_like(amax), rec)
                rec["reason"] = "no alpha lowers the simulated int8 error"
                continue
            s = _scales(amax, wmax, alpha)
            for lin in g.linears:   # recomputed from the weight at each use under --max-memory
                scale = functools.partial(_scaled, s=s, k_axis=lin.k_axis, groups=lin.groups)
                set_constant_input(model.graph, lin.node, 1, derived_tensor(lin.weight.const_value, scale, lin.weight.name))
            del weights
            fold_division(model.graph, g, s)
            if g.kind != "explicit-mul":
                for tensor in g.rescaled():
                    ctx.rescales.note(tensor.name, g.channel_axis, s)
            rec.update({"status": "smoothed", "alpha": alpha, "reason": "",
                        "max_channel_ratio": round(float(amax.max() / max(np.median(amax), 1e-12)), 2)})
            changed += 1
            if centers:
                self._center(model.graph, g, xlo, xhi, s, rec)
        return changed

    @staticmethod
    def _center(graph: ir.Graph, g: Group, xlo: np.ndarray, xhi: np.ndarray, s: np.ndarray, rec: dict) -> int:
        """X − m with m the middle of each (smoothed) channel's range: the affine's Add takes −m,
        each Conv's bias W·m (exact: the Convs do not pad). 1: done."""
        m = ((np.asarray(xlo, np.float64) + np.asarray(xhi, np.float64)) / 2) / s
        rank = len(g.x.shape)
        idx = 1 if g.bias_add.inputs[1].const_value is not None else 0
        b = g.bias_add.inputs[idx].const_value.numpy()
        shifted = times_channels(b.astype(np.float64), np.ones_like(channel_shaped(m, rank, 1)), rank) \
            - channel_shaped(m, rank, 1)
        set_constant_input(graph, g.bias_add, idx, shifted.astype(b.dtype))
        for lin in g.linears:
            w = lin.node.inputs[1].const_value.numpy().astype(np.float64)        # [Cout, Cin/g, kh, kw]
            groups = lin.node.attributes.get_int("group", 1)
            per_out, cin_g = w.shape[0] // groups, w.shape[1]
            m_in = m.reshape(groups, cin_g)[np.arange(w.shape[0]) // per_out]       # [Cout, Cin/g]
            shift_conv_bias(graph, lin.node, (w.sum(axis=(2, 3)) * m_in).sum(axis=1))
        rec["centered"] = True
        return 1


def _scaled(w: np.ndarray, *, s: np.ndarray, k_axis: int, groups: int | None) -> np.ndarray:
    """A smoothed weight: input channels times s (a derived tensor's transform)."""
    return scale_input_channels(w.astype(np.float32), s, k_axis, groups).astype(np.float32)


def _centerable(g: Group) -> bool:
    """An affine-conv group whose affine ends in an Add of a constant and whose Convs take no padding."""
    if g.kind != "affine-conv" or g.bias_add is None:
        return False
    for lin in g.linears:
        attrs = lin.node.attributes
        if any(attrs.get_ints("pads", (0, 0, 0, 0))) or attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return False
        bias = lin.node.inputs[2] if len(lin.node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            return False
    return True


def _scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(amax, _EPS), alpha) / np.power(np.maximum(wmax, _EPS), 1.0 - alpha)
    s = np.where((amax > 0) & (wmax > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _float_outputs(x, weights, linears, *, conv: bool) -> list[np.ndarray]:
    """X·W of each linear of a group, or each Conv's outputs at the sampled patches [rows, G,
    Cout/g]: what every α's simulated error is measured against. float32 products (their
    rounding is far below the int8 error measured), float64 results: the error sums are float64."""
    if conv:
        return [np.einsum("pgk,gok->pgo", p, w.reshape(lin.conv.groups, w.shape[0] // lin.conv.groups, -1)
                          .astype(np.float32), optimize=True).astype(np.float64)
                for p, w, lin in zip(x, weights, linears)]
    return [(np.asarray(x, np.float32) @ np.asarray(w if lin.k_axis == 0 else w.T, np.float32)).astype(np.float64)
            for w, lin in zip(weights, linears)]


def _simulated_error(x: np.ndarray, x_range, weights, linears, s: np.ndarray, act_dtype: str,
                     act_symmetric: bool, per_tensor: list[bool] | None = None, per_token: bool = False,
                     refs: list[np.ndarray] | None = None) -> float:
    """Mean over the group's linears of the relative squared error of X·W with X/s quantized
    per tensor as the target will (its activation dtype and symmetry: an asymmetric uint8
    range fits a GELU output's short negative tail, a symmetric one does not) and W·s in
    int8 per output channel, or per tensor where the target quantizes that op's weights so
    (`per_tensor_weight_ops`, Ascend's MatMul: the outliers SmoothQuant moves into W then
    cost every output channel). X/s's range comes from the full-data channel extremes, not
    just the sampled rows: the outlier tokens that set it are rare. With `per_token`, each row
    of X/s gets its own symmetric int8 scale, as dynamic per-token quantization does. `refs`:
    _float_outputs of the same rows, when the caller already has them."""
    refs = refs or _float_outputs(x, weights, linears, conv=False)
    xs = x / s
    if per_token:
        lo_t, hi_t = reduce_absmax(xs, 0)
        xscale, xzp = compute_qparams(lo_t, hi_t, "int8", symmetric=True)
        xq = fake_quantize(xs, xscale, xzp, "int8", axis=0)
    else:
        lo, hi = float(np.min(x_range[0] / s)), float(np.max(x_range[1] / s))
        xscale, xzp = compute_qparams(lo, hi, act_dtype, symmetric=act_symmetric)
        xq = fake_quantize(xs, xscale, xzp, act_dtype)
    errors = []
    for i, (w, lin) in enumerate(zip(weights, linears)):
        w2 = w if lin.k_axis == 0 else w.T                    # [K, N]
        ws = w2 * s[:, None]
        axis = None if per_tensor and per_tensor[i] else 1
        lo_w, hi_w = reduce_absmax(ws, axis)
        wscale, wzp = compute_qparams(lo_w, hi_w, "int8", symmetric=True, restricted=True)
        wq = fake_quantize(ws, wscale, wzp, "int8", axis=axis)
        ref = refs[i]
        # float32 products, as for Convs: their rounding (~1e-7 relative) is far below the int8
        # error being compared, and a float64 GEMM took half of a 7B compile; the sums are float64
        err = ref - (xq @ wq).astype(np.float64)
        den = float(np.sum(ref * ref))
        errors.append(float(np.sum(err * err)) / den if den > 0 else 0.0)
    return float(np.mean(errors))


def _simulated_conv_error(patches: list[np.ndarray], x_range, weights, linears, s: np.ndarray, act_dtype: str,
                          act_symmetric: bool, per_tensor: list[bool] | None = None, per_token: bool = False,
                          refs: list[np.ndarray] | None = None) -> float:
    """_simulated_error for Conv consumers: each Conv's sampled input patches [rows, G, K]
    (K = Cin/g·kh·kw, channel-major) stand for X; X/s quantized per tensor, W·s in int8 per
    output channel (or per tensor), the relative squared error of the Conv's outputs."""
    refs = refs or _float_outputs(patches, weights, linears, conv=True)
    lo, hi = float(np.min(x_range[0] / s)), float(np.max(x_range[1] / s))
    xscale, xzp = compute_qparams(lo, hi, act_dtype, symmetric=act_symmetric)
    errors = []
    for i, (x, w, lin) in enumerate(zip(patches, weights, linears)):
        groups, taps = lin.conv.groups, int(np.prod(w.shape[2:]))
        s_cols = np.repeat(s.reshape(groups, -1), taps, axis=1)                    # [G, K]
        xs = x / s_cols
        xq = fake_quantize(xs, xscale, xzp, act_dtype)
        ws = scale_input_channels(w, s, 1, groups)
        axis = None if per_tensor and per_tensor[i] else 0
        lo_w, hi_w = reduce_absmax(ws, axis)
        wscale, wzp = compute_qparams(lo_w, hi_w, "int8", symmetric=True, restricted=True)
        wq = fake_quantize(ws, wscale, wzp, "int8", axis=axis)
        wqg = wq.reshape(groups, w.shape[0] // groups, -1).astype(np.float32)     # [G, Cout/g, K]
        ref = refs[i]
        err = ref - np.einsum("pgk,gok->pgo", xq.astype(np.float32), wqg, optimize=True)
        den = float(np.sum(ref * ref))
        errors.append(float(np.sum(err * err)) / den if den > 0 else 0.0)
    return float(np.mean(errors))
