"""gptq: weight quantization that compensates each column's rounding error in the columns
not yet quantized (GPTQ, Frantar et al. 2023), from a per-layer Hessian of calibration inputs.

For a linear y = x·W (W as [K, N]), H = 2·XᵀX / rows over the calibration rows of its input.
Columns of Wᵀ (input channels k) are quantized in order; after each, the error divided by
[H⁻¹]_kk, times the row k of the upper Cholesky factor of H⁻¹, is subtracted from the
columns after it, so later weights absorb what rounding lost where the inputs make it
matter. Blocked (lazy batch updates: one matrix product per block of columns) and
vectorised over the output channels; `act_order` quantizes the columns with the largest
Hessian diagonal first (with per-group scales then fixed up front on the original weights,
so groups stay contiguous for ONNX's block_size).

The pass quantizes with the scheme in its `weight` key (it must equal the later `quantize`
step's; the quantize pass takes these integers and scales as they are, and falls back to
rounding with a warning if the schemes differ) and writes the dequantized weights back,
so the float graph stays consistent until `quantize` runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np
import onnx_ir as ir

from qcompile.errors import DataError, RecipeError
from qcompile.numerics import compute_qparams, full_range_qparams, qrange
from qcompile.registry import QPass, register_pass
from qcompile.schemes import WeightScheme

from .calibrate import stream_tensors


@dataclasses.dataclass(frozen=True)
class PrecomputedWeight:
    """Integers and scales a weight algorithm chose, in the layout quantize writes."""
    scheme: WeightScheme
    granularity: str
    axis: int | None
    block: int | None
    q: np.ndarray        # [K, N] (MatMul layout), weight dtype's values
    scale: np.ndarray    # [N] per channel, or [ceil(K/g), N] per group
    zero_point: np.ndarray


@register_pass("gptq")
class GPTQ(QPass):
    """GPTQ: Hessian-aware weight rounding with error compensation, per linear layer."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        weight: WeightScheme = WeightScheme(dtype="int4", granularity="per_group", group_size=32, full_range=True)
        block_size: int = 128        # columns per lazy batch update
        damp: float = 0.01           # fraction of mean(diag H) added to the diagonal
        act_order: bool = False
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 128

        def validate(self):
            if not 0.0 < self.damp < 1.0:
                return "damp", f"must be in (0, 1), got {self.damp}"
            if self.block_size < 1:
                return "block_size", "must be at least 1"
            if self.weight.dtype not in ("int4", "int8", "uint4", "uint8"):
                return "weight.dtype", f"GPTQ rounds integer weights, not {self.weight.dtype}"
            if self.weight.rounding != "half_even":
                return "weight.rounding", "GPTQ chooses the rounding itself; leave rounding at half_even"
            return None

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"weights_rounded"}

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        layers = [n for n in model.graph if _is_linear(n) and _in_scope(n.name or "", cfg)]
        if not layers:
            ctx.report["gptq"] = {"layers": 0}
            return False
        inputs = list({n.inputs[0].name: n.inputs[0] for n in layers}.values())
        hessians, rows = self._hessians(model, inputs)
        records = {}
        for node in layers:
            w_val = node.inputs[1]
            w = w_val.const_value.numpy().astype(np.float64)
            transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            w_kn = w.T if transposed else w                      # [K, N]
            h = hessians[node.inputs[0].name]
            if rows[node.inputs[0].name] < w_kn.shape[0]:
                ctx.warn(f"gptq: {node.name} saw {rows[node.inputs[0].name]} input rows for K = {w_kn.shape[0]}; "
                         "its Hessian is rank-deficient (damping keeps it usable): more calibration samples help")
            result = gptq_quantize(w_kn, h, cfg.weight, block_size=cfg.block_size, damp=cfg.damp,
                                   act_order=cfg.act_order)
            ctx.precomputed_weights[w_val.name] = result
            deq = _dequantized(result)
            w_val.const_value = ir.tensor((deq.T if transposed else deq).astype(np.float32), name=w_val.name)
            rtn = gptq_quantize(w_kn, None, cfg.weight, block_size=cfg.block_size, damp=cfg.damp, act_order=False)
            records[node.name] = {"reconstruction_error": _recon_error(w_kn, deq, h),
                                  "rtn_reconstruction_error": _recon_error(w_kn, _dequantized(rtn), h)}
        ctx.report["gptq"] = {"layers": len(records), "scheme": cfg.weight.label(), "act_order": cfg.act_order,
                              "per_layer": records}
        return True

    def _hessians(self, model: ir.Model, xs: list[ir.Value]):
        """H = 2 XᵀX / rows per input tensor, over the calibration data (float64)."""
        cfg, ctx = self.config, self.ctx
        dataset = ctx.calib
        if dataset is None:
            raise DataError("gptq needs calibration data (--calib): its Hessians come from real layer inputs")
        names = [x.name for x in xs]
        samples = min(cfg.samples, dataset.num_samples)
        for x in xs:
            per_sample, width = _rows_per_sample(x), x.shape[-1] if x.shape is not None else None
            if per_sample and isinstance(width, int) and samples * per_sample < width:
                raise RecipeError(
                    f"{samples} calibration samples give {samples * per_sample} rows of {x.name!r}, fewer than its "
                    f"{width} channels: its Hessian would be rank-deficient",
                    pass_name="gptq", key="samples",
                    hint=f"GPTQ needs at least {-(-width // per_sample)} samples here (one row per input channel; "
                         f"several times more is better): pass more --calib data or raise gptq.samples")
        acc = {n: None for n in names}
        count = dict.fromkeys(names, 0)
        for arrays, _ in stream_tensors(model, xs, dataset, samples=cfg.samples, label="gptq", progress=ctx.progress):
            for name, array in arrays.items():
                x = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
                xtx = x.T @ x
                acc[name] = xtx if acc[name] is None else acc[name] + xtx
                count[name] += x.shape[0]
        return {n: 2.0 * acc[n] / max(count[n], 1) for n in names}, count


def gptq_quantize(w: np.ndarray, h: np.ndarray | None, scheme: WeightScheme, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> PrecomputedWeight:
    """Quantize W [K, N] with GPTQ error feedback (`h` None: plain rounding, for comparison)."""
    w = np.array(w, dtype=np.float64)
    k, n = w.shape
    group = scheme.group_size if scheme.granularity == "per_group" else None
    qmin, qmax = _grid(scheme)
    perm = np.arange(k)
    if h is not None:
        h = np.array(h, dtype=np.float64)
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        w[dead, :] = 0.0
        if act_order:
            perm = np.argsort(-np.diag(h), kind="stable")
    # scales: per channel (from the original W), per group (fixed up front when columns are permuted)
    fixed_scales = None
    if group is None:
        fixed_scales = _scales(w, scheme)[None, :].repeat(k, axis=0)      # [K, N]
    elif act_order and h is not None:
        g_scale = np.stack([_scales(w[s:s + group], scheme) for s in range(0, k, group)])
        fixed_scales = np.repeat(g_scale, group, axis=0)[:k]
    q = np.zeros((k, n), dtype=np.int64)
    scale_rows = np.zeros((k, n), dtype=np.float64)
    if h is None and fixed_scales is None:  # plain rounding: whole groups at once
        fixed_scales = np.repeat(np.stack([_scales(w[s:s + group], scheme) for s in range(0, k, group)]),
                                 group, axis=0)[:k]
    if h is None:
        q = np.clip(np.rint(w / fixed_scales), qmin, qmax).astype(np.int64)
        scale_rows = fixed_scales
        hinv = None
    else:
        h = h[np.ix_(perm, perm)]
        h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T                    # upper factor of H^-1
    wp = w[perm]                                                         # rows = input channels, in order
    step = max(block_size - block_size % group, group) if group else block_size
    for i1 in range(0, k if hinv is not None else 0, step):
        i2 = min(i1 + step, k)
        w1 = wp[i1:i2].copy()
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if fixed_scales is not None:
                s = fixed_scales[perm[col]]
            elif col % group == 0:  # blocks hold whole groups: the group's rows, as updated so far
                s = _scales(w1[i:i + group], scheme)
            qi = np.clip(np.rint(w1[i] / s), qmin, qmax)
            q[perm[col]] = qi
            scale_rows[perm[col]] = s
            if hinv is not None:
                d = hinv[col, col]
                e = (w1[i] - qi * s) / d
                w1[i + 1:] -= np.outer(hinv[col, col + 1:i2], e)
                err[i] = e
        if hinv is not None:
            wp[i2:] -= hinv[i1:i2, i2:].T @ err
    if group is None:
        scale = scale_rows[0].astype(np.float32)
        axis, block = 1, None
    else:
        scale = scale_rows[::group].astype(np.float32)                   # [ceil(K/g), N]
        axis, block = 0, group
    dtype = np.int8 if qmin < 0 else np.uint8
    zp = np.zeros(scale.shape, dtype=dtype)
    return PrecomputedWeight(scheme, scheme.granularity, axis, block, q.astype(dtype), scale, zp)


def _grid(scheme: WeightScheme) -> tuple[int, int]:
    if scheme.full_range:
        return qrange(scheme.dtype)
    return qrange(scheme.dtype, restricted=scheme.symmetric)


def _scales(rows: np.ndarray, scheme: WeightScheme) -> np.ndarray:
    """One scale per output channel over `rows` (a group of input channels), as quantize computes it."""
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    if scheme.full_range:
        scale, _ = full_range_qparams(lo, hi, scheme.dtype)
    else:
        scale, _ = compute_qparams(lo, hi, scheme.dtype, symmetric=True, restricted=True)
    return scale.astype(np.float64)


def _dequantized(p: PrecomputedWeight) -> np.ndarray:
    scale = np.repeat(p.scale, p.block, axis=0)[:p.q.shape[0]] if p.block else p.scale[None, :]
    return p.q.astype(np.float64) * scale


def _recon_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """tr((W−Q)ᵀ H (W−Q)) / tr(Wᵀ H W): the layer's output error on the calibration inputs."""
    d = w - wq
    num = float(np.sum(d * (h @ d)))
    den = float(np.sum(w * (h @ w)))
    return round(num / den, 8) if den > 0 else 0.0


def _rows_per_sample(x: ir.Value) -> int | None:
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    return int(np.prod(x.shape[:-1])) // max(int(x.shape[0]), 1) if len(x.shape) > 1 else 1


def _is_linear(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or node.inputs[0].const_value is not None:
        return False
    return not (node.op_type == "Gemm" and node.attributes.get_int("transA", 0))


def _in_scope(name: str, config) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.include) and \
        not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
