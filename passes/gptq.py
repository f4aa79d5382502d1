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
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.analyses import PrecomputedWeight
from qcompile.config import at_least
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.numerics import compute_qparams, full_range_qparams, qrange
from qcompile.registry import QPass, register_pass
from qcompile.schemes import WeightScheme, builtin_scheme, mixable_schemes
from qcompile.weight_store import stored_tensor

from .conv_patches import ConvGeometry
from .hessians import hessian_groups, is_conv, is_linear
from .scope import feeds_model_output, in_scope


@register_pass("gptq")
class GPTQ(QPass):
    """GPTQ: Hessian-aware weight rounding with error compensation, per linear layer."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        weight: WeightScheme = WeightScheme(dtype="int4", granularity="per_group", group_size=32, full_range=True)
        block_size: int = 128        # columns per lazy batch update
        damp: float = 0.01           # fraction of mean(diag H) added to the diagonal
        act_order: bool = False
        # per group, shrink the max|w| scale where that lowers the Hessian-weighted rounding error
        scale_search: bool = False
        ops: tuple[Literal["MatMul", "Gemm", "Conv"], ...] = ("MatMul", "Gemm", "Conv")
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 128
        conv_positions: int = 1024   # Conv: output positions per sample whose input patches enter H
        # the scheme of the layers feeding a model output, as the later quantize step's
        # `output_layers` gives them (a built-in scheme name; float: left alone)
        output_layers: str | None = None
        # under --max-memory: each block's Hessians from the outputs of the blocks before it as
        # rounded (GPTQ's sequential order), not from the float model's
        sequential: bool = False

        def validate(self):
            if not 0.0 < self.damp < 1.0:
                return "damp", f"must be in (0, 1), got {self.damp}"
            problem = at_least(self, block_size=1, conv_positions=1)
            if problem:
                return problem
            if self.weight.dtype not in ("int4", "int8", "uint4", "uint8"):
                return "weight.dtype", f"GPTQ rounds integer weights, not {self.weight.dtype}"
            if self.weight.rounding != "half_even":
                return "weight.rounding", "GPTQ chooses the rounding itself; leave rounding at half_even"
            if self.output_layers is not None:
                try:
                    builtin_scheme(self.output_layers)
                except KeyError:
                    return "output_layers", f"unknown scheme {self.output_layers!r}; one of: {', '.join(mixable_schemes())}"
            return None

    GIVES = frozenset({Fact.WEIGHTS_ROUNDED})
    _deferred: list | None = None    # (weight, rounded tensor) written after the stream (run)
    # its error feedback moves every weight, pruned zeros included
    INVALIDATES = FLOAT_MODEL_CHANGED | {Fact.SPARSE}

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        outputs = set(model.graph.outputs)
        schemes, skipped = {}, {}
        for n in model.graph:
            if n.op_type in cfg.ops and is_linear(n) and in_scope(n.name, cfg):
                scheme = self._scheme(n, outputs)
                if scheme is None:
                    skipped[n.name] = "output_layers: float"
                else:
                    schemes[n.name] = scheme
        linears = [n for n in model.graph if n.name in schemes]
        convs = {}
        for n in model.graph:
            if "Conv" in cfg.ops and is_conv(n) and in_scope(n.name, cfg):
                geo = ConvGeometry.of(n, n.inputs[1].const_value.shape)
                if geo is None:
                    skipped[n.name] = "not a 2-D Conv with explicit pads"
                elif cfg.weight.granularity != "per_channel":
                    skipped[n.name] = f"gptq rounds Conv weights per channel, not {cfg.weight.granularity}"
                else:
                    convs[n.name] = (n, geo)
        if not linears and not convs:
            ctx.reports["gptq"] = {"layers": 0, "skipped": skipped}
            return False
        records, deficient = {}, []
        sequential = self._sequential()
        # each group of Hessians (all of them, or under --max-memory one block's) is used and dropped,
        # block by block before the next block's session is made; under --max-memory the rounded
        # weights (spilled) go into the graph once all are rounded, unless the later blocks are to
        # run on them (sequential)
        self._deferred = [] if ctx.memory is not None and not sequential else None
        for hessians, rows in hessian_groups(model, linears, convs, ctx, samples=cfg.samples,
                                             conv_positions=cfg.conv_positions, pass_name="gptq",
                                             block_ends=True, sequential=sequential):
            self._round_group(linears, convs, schemes, hessians, rows, records, deficient)
        for w_val, tensor in self._deferred or ():
            w_val.const_value = tensor
        order = [n.name for n in linears] + list(convs)
        records = {name: records[name] for name in order if name in records}
        if deficient:  # e.g. the 1×1 Convs of squeeze-excite blocks: one row per sample
            ctx.warn(f"gptq: {len(deficient)} layer(s) saw fewer input rows than Hessian columns, so their Hessians "
                     f"are rank-deficient (damping keeps them usable; more calibration samples help): "
                     f"{', '.join(deficient[:3])}{', …' if len(deficient) > 3 else ''}")
        ctx.reports["gptq"] = {"layers": len(records), "scheme": cfg.weight.label(), "act_order": cfg.act_order,
                              "sequential": sequential, "per_layer": records, "skipped": skipped, "rank_deficient": deficient}
        return bool(records)

    def _sequential(self) -> bool:
        """Whether the Hessians follow the rounded blocks: `sequential` under --max-memory."""
        cfg, ctx = self.config, self.ctx
        if not cfg.sequential:
            return False
        if ctx.memory is None:
            ctx.warn("gptq.sequential takes effect block by block, under --max-memory; in one whole-model "
                     "session every Hessian comes from the float model's activations")
            return False
        if ctx.sharding.sharded:
            ctx.warn("gptq.sequential: its Hessians are streamed in the compile's own process (each block waits "
                     "for the one before it to be rounded); --workers/--ray serve the other passes")
        return True

    def _round_group(self, linears, convs, schemes, hessians, rows, records, deficient) -> None:
        """GPTQ-round the layers whose Hessians are in `hessians`."""
        cfg = self.config
        last_reader = {node.inputs[0].name: node.name for node in linears}   # each H is dropped after it
        for node in linears:
            if node.inputs[0].name not in hessians:
                continue
            w_val = node.inputs[1]
            transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            w = w_val.const_value.numpy().astype(np.float64)
            w_kn = w.T if transposed else w                      # [K, N]
            h, n_rows = hessians[node.inputs[0].name], rows[node.inputs[0].name]
            quantize = lambda use_h: gptq_quantize(w_kn, h if use_h else None, schemes[node.name],  # noqa: E731
                                                   block_size=cfg.block_size, damp=cfg.damp,
                                                   act_order=cfg.act_order and use_h,
                                                   scale_search=cfg.scale_search and use_h)
            error = lambda p: _recon_error(w_kn, _dequantized(p), h)  # noqa: E731
            layout = lambda deq: deq.T if transposed else deq  # noqa: E731
            records[node.name] = self._keep_better(w_val, quantize, error, layout)
            if n_rows < w_kn.shape[0]:
                deficient.append(f"{node.name} ({n_rows} rows, K = {w_kn.shape[0]})")
            del w, w_kn, h, quantize, error
            if last_reader[node.inputs[0].name] == node.name:
                del hessians[node.inputs[0].name]
        for name, (node, geo) in convs.items():
            if name not in hessians:
                continue
            w_val = node.inputs[1]
            w = w_val.const_value.numpy().astype(np.float64)
            h = hessians[name]
            quantize = lambda use_h: gptq_conv(w, h if use_h else None, cfg.weight,  # noqa: E731
                                               block_size=cfg.block_size, damp=cfg.damp,
                                               act_order=cfg.act_order and use_h)
            error = lambda p: _conv_recon_error(w, _dequantized_conv(p), h)  # noqa: E731
            records[name] = self._keep_better(w_val, quantize, error, lambda deq: deq, conv=True)
            if rows[name] < h.shape[-1]:
                deficient.append(f"{name} ({rows[name]} rows, K = {h.shape[-1]})")

    def _scheme(self, node: ir.Node, outputs: set) -> WeightScheme | None:
        """The weight scheme GPTQ rounds this linear to: `output_layers`' for a layer feeding a
        model output (None: it stays float), else the pass's."""
        if self.config.output_layers is not None and feeds_model_output(node, outputs):
            return builtin_scheme(self.config.output_layers).weight
        return self.config.weight

    def _keep_better(self, w_val: ir.Value, quantize, error, layout, conv: bool = False) -> dict:
        """Quantize with GPTQ (`quantize(True)`) and plainly (`quantize(False)`); keep whichever has the lower
        Hessian-weighted reconstruction error (GPTQ's greedy order can lose to rounding where the
        inputs are uncorrelated), hand it to `quantize`, write its dequantized values back."""
        gptq, rtn = quantize(True), quantize(False)
        gptq_error, rtn_error = error(gptq), error(rtn)
        chosen, kept = ("gptq", gptq) if gptq_error <= rtn_error else ("rtn", rtn)
        self.ctx.weights.put(w_val.name, kept)
        deq = _dequantized_conv(kept) if conv else _dequantized(kept)
        rounded = stored_tensor(layout(deq).astype(np.float32), w_val.name)
        if self._deferred is None:
            w_val.const_value = rounded
        else:
            self._deferred.append((w_val, rounded))
        return {"reconstruction_error": min(gptq_error, rtn_error), "gptq_reconstruction_error": gptq_error,
                "rtn_reconstruction_error": rtn_error, "kept": chosen}


def gptq_conv(w: np.ndarray, h: np.ndarray | None, scheme: WeightScheme, *, block_size: int = 128,
              damp: float = 0.01, act_order: bool = False) -> PrecomputedWeight:
    """GPTQ on a Conv weight [Cout, Cin/g, kh, kw] with one Hessian per group ([G, K, K], K = Cin/g·kh·kw;
    `h` None: plain rounding). Each group is a linear map from patches to its Cout/g outputs, so
    its columns are quantized in patch order (input channel, tap row, tap column); the integers
    come back in the Conv's layout with one scale per output channel."""
    cout = w.shape[0]
    groups = h.shape[0] if h is not None else 1
    per_group = cout // groups
    qs, scales = [], []
    for g in range(groups):
        w_kn = w[g * per_group:(g + 1) * per_group].reshape(per_group, -1).T          # [K, Cout/g]
        r = gptq_quantize(w_kn, None if h is None else h[g], scheme, block_size=block_size, damp=damp,
                          act_order=act_order)
        qs.append(r.q.T)
        scales.append(np.broadcast_to(r.scale, (per_group,)))
    q = np.concatenate(qs).reshape(w.shape)
    scale = np.concatenate(scales).astype(np.float32)
    zp = np.zeros(scale.shape, dtype=q.dtype)
    granularity = scheme.granularity
    return PrecomputedWeight(scheme, granularity, 0 if granularity == "per_channel" else None, None, q, scale, zp)


def gptq_quantize(w: np.ndarray, h: np.ndarray | None, scheme: WeightScheme, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, scale_search: bool = False) -> PrecomputedWeight:
    """Quantize W [K, N] with GPTQ error feedback (`h` None: plain rounding, for comparison);
    `scale_search` picks each group's scale by its Hessian-diagonal-weighted rounding error."""
    w = np.array(w, dtype=np.float64)
    k, n = w.shape
    group = scheme.group_size if scheme.granularity == "per_group" else None
    qmin, qmax = _grid(scheme)
    perm = np.arange(k)
    if h is not None:
        # the caller's H, changed on its diagonal only and given back as it was (a copy of a 7B
        # down_proj's is 970 MB); a permuted one (act_order) is a copy of its own
        h = np.asarray(h, dtype=np.float64)
        given_diag = h.diagonal().copy()
        dead = given_diag == 0
        h[dead, dead] = 1.0
        w[dead, :] = 0.0
        if act_order:
            perm = np.argsort(-np.diag(h), kind="stable")
    # scales: per channel (from the original W), per group (fixed up front when columns are permuted)
    fixed_scales = None
    hdiag = np.diag(h).copy() if (h is not None and scale_search) else None
    imp = (lambda s, e: None if hdiag is None else hdiag[s:e])  # noqa: E731
    if group is None:
        fixed_scales = _scales(w, scheme, imp(0, k))[None, :].repeat(k, axis=0)      # [K, N]
    elif act_order and h is not None:
        g_scale = np.stack([_scales(w[s:s + group], scheme, imp(s, s + group)) for s in range(0, k, group)])
        fixed_scales = np.repeat(g_scale, group, axis=0)[:k]
    q = np.zeros((k, n), dtype=np.int16)              # 4- and 8-bit integers; a 7B down_proj's [K, N] is 45M of them
    scale_rows = np.zeros((k, n), dtype=np.float32)   # stored as float32 in the end anyway
    if h is None and fixed_scales is None:  # plain rounding: whole groups at once
        fixed_scales = np.repeat(np.stack([_scales(w[s:s + group], scheme) for s in range(0, k, group)]),
                                 group, axis=0)[:k]
    if h is None:
        q = np.clip(np.rint(w / fixed_scales), qmin, qmax).astype(np.int16)
        scale_rows = fixed_scales
        hinv = None
    else:
        given = h
        if act_order:
            h = h[np.ix_(perm, perm)]
        try:
            h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
            hinv = upper_cholesky_of_inverse(h)                         # upper factor of H^-1
        finally:
            given[np.diag_indices(k)] = given_diag
        del h, given
    wp = w[perm] if act_order else w                                     # rows = input channels, in order
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
                s = _scales(w1[i:i + group], scheme, None if hdiag is None else hdiag[perm[col:col + group]])
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


def upper_cholesky_of_inverse(h: np.ndarray, block: int = 256) -> np.ndarray:
    """U upper triangular with Uᵀ·U = H⁻¹ (H symmetric positive definite), without forming H⁻¹:
    with J the reversal, J·H·J = L·Lᵀ gives H⁻¹ = (J·L⁻¹·J)ᵀ(J·L⁻¹·J), and L⁻¹ is inverted in
    place block row by block row. Two [K, K] arrays at most, where inv + cholesky took four or
    five (a 7B down_proj's Hessian is 970 MB in float64)."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    k = lower.shape[0]
    for j in range(0, k, block):    # rows < j already hold L⁻¹'s; extend by rows j..j+block
        e = min(j + block, k)
        diag = np.linalg.inv(lower[j:e, j:e])
        if j:
            lower[j:e, :j] = -(diag @ (lower[j:e, :j] @ lower[:j, :j]))
        lower[j:e, j:e] = diag
    return lower[::-1, ::-1]


def _grid(scheme: WeightScheme) -> tuple[int, int]:
    if scheme.full_range:
        return qrange(scheme.dtype)
    return qrange(scheme.dtype, restricted=scheme.symmetric)


_SHRINK = np.linspace(1.0, 0.7, 16)     # scale_search: the fractions of the max|w| scale tried (0.5 measured no better)


def _scales(rows: np.ndarray, scheme: WeightScheme, importance: np.ndarray | None = None) -> np.ndarray:
    """One scale per output channel over `rows` (a group of input channels), as quantize computes
    it; with `importance` (the rows' Hessian diagonal), the scale shrunk by the fraction in
    _SHRINK whose rounding error Σ_r importance_r (w - q·s)² is lowest, per column (clipping
    the group's largest weights when that buys finer steps for the rest)."""
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    if scheme.full_range:
        scale, _ = full_range_qparams(lo, hi, scheme.dtype)
    else:
        scale, _ = compute_qparams(lo, hi, scheme.dtype, symmetric=True, restricted=True)
    scale = scale.astype(np.float64)
    if importance is None:
        return scale
    qmin, qmax = _grid(scheme)
    best, best_err = scale, None
    for f in _SHRINK:
        s = np.where(scale != 0, scale * f, 1.0)
        d = rows - np.clip(np.rint(rows / s), qmin, qmax) * s
        err = (importance[:, None] * d * d).sum(axis=0)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


def _dequantized(p: PrecomputedWeight) -> np.ndarray:
    scale = np.repeat(p.scale, p.block, axis=0)[:p.q.shape[0]] if p.block else p.scale[None, :]
    return p.q.astype(np.float64) * scale


def _dequantized_conv(p: PrecomputedWeight) -> np.ndarray:
    return p.q.astype(np.float64) * p.scale.reshape(-1, 1, 1, 1)


def _recon_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """tr((W−Q)ᵀ H (W−Q)) / tr(Wᵀ H W): the layer's output error on the calibration inputs."""
    d = w - wq
    num = float(np.sum(d * (h @ d)))
    den = float(np.sum(w * (h @ w)))
    return round(num / den, 8) if den > 0 else 0.0


def _conv_recon_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """_recon_error summed over a Conv's groups (w, wq [Cout, Cin/g, kh, kw]; h [G, K, K])."""
    groups = h.shape[0]
    d = (w - wq).reshape(groups, w.shape[0] // groups, -1)                        # [G, Cout/g, K]
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    # d·H·dᵀ per group as one batched BLAS product (a three-operand einsum runs an unblocked
    # loop: 25 s of 45 on ddddocr's detector, whose Convs reach K = 2304)
    num = float(np.sum(np.matmul(d, h) * d))
    den = float(np.sum(np.matmul(wg, h) * wg))
    return round(num / den, 8) if den > 0 else 0.0
