"""sparsify: prune weights to a sparsity, unstructured or 2:4 along the input channels — the
sparse half of W8A8SC (sparse + quantized, msModelSlim's storage-extreme scheme).

Two methods, each per layer:

* `sparsegpt` (Frantar & Alistarh 2023): columns of W [K, N] (input channels k) are visited in
  order; in each block of `block_size` columns the weights to prune are those with the
  smallest w² / [H⁻¹]²_kk (H = 2·XᵀX / rows from the calibration inputs, passes/hessians.py),
  and each pruned weight's error, divided by [H⁻¹]_kk, is spread over the columns not yet
  visited along the upper Cholesky factor of H⁻¹ — GPTQ's update with zero in place of a
  rounded value — so the kept weights absorb what pruning removed where the inputs make it
  matter. Unstructured: the `sparsity` fraction of each block, per output channel.
  2:4: of every 4 consecutive input channels, 2 pruned per output channel.
* `magnitude`: the smallest |w| — per layer (unstructured) or of every 4 input channels (2:4).

2:4 along the input channels (Cin for a Conv, at each kernel tap) is the pattern ATC's
`--sparsity=1` compresses on Atlas 200I/500 A2 (310B) and A2/A3 (910B): every 4 int8
weights become 2 int8 values and two 2-bit indexes, 3/4 of the dense bytes (CANN ATC
`--sparsity` page). The report gives each layer's sparsity and the stored size that way;
unstructured sparsity is sized as int8 values plus a one-bit mask per weight.

Run it before `calibrate` (it changes the float model) and with no `gptq` after it (GPTQ's
error feedback would fill the zeros again); `quantize` keeps zeros at zero.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.errors import RecipeError
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.registry import QPass, register_pass
from qcompile.weight_store import stored_tensor

from .conv_patches import ConvGeometry
from .hessians import is_conv, is_linear, layer_hessians, weight_kn
from .scope import feeds_model_output, in_scope

GROUP, KEEP = 4, 2   # the N:M pattern: of every 4 input channels, 2 kept


@register_pass("sparsify")
class Sparsify(QPass):
    """Prune weights (SparseGPT or magnitude), unstructured or 2:4 along the input channels."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        sparsity: float = 0.5
        pattern: Literal["2:4", "unstructured"] = "2:4"
        method: Literal["sparsegpt", "magnitude"] = "sparsegpt"
        ops: tuple[Literal["MatMul", "Gemm", "Conv"], ...] = ("MatMul", "Gemm", "Conv")
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 128
        block_size: int = 128        # columns per lazy batch update (SparseGPT)
        damp: float = 0.01           # fraction of mean(diag H) added to the diagonal
        conv_positions: int = 4096   # Conv: output positions per sample whose input patches enter H
        # 2:4 on a layer whose input channels are not a multiple of 4 (an RGB stem Conv, a
        # depthwise Conv): an error naming it (false), or leave it dense and list it (true)
        skip_unfit: bool = False
        # layers feeding a model output (a decoder's logits projection, a classifier head), read
        # off the graph: left dense (as SparseGPT leaves lm_head), or pruned like the rest
        output_layers: Literal["dense", "prune"] = "dense"

        def validate(self):
            if not 0.0 < self.sparsity < 1.0:
                return "sparsity", f"must be in (0, 1), got {self.sparsity}"
            if self.pattern == "2:4" and self.sparsity != 0.5:
                return "sparsity", f"2:4 prunes exactly half (0.5), got {self.sparsity}; use pattern: unstructured"
            if not 0.0 < self.damp < 1.0:
                return "damp", f"must be in (0, 1), got {self.damp}"
            if self.block_size % GROUP:
                return "block_size", f"must be a multiple of {GROUP}, got {self.block_size}"
            return at_least(self, samples=1, block_size=GROUP, conv_positions=1)

    GIVES = frozenset({Fact.SPARSE})
    INVALIDATES = FLOAT_MODEL_CHANGED

    @classmethod
    def check_model(cls, config, model: ir.Model) -> None:
        """A 2:4 pattern a layer's input channels cannot take is refused before any work."""
        if config.pattern == "2:4" and not config.skip_unfit:
            unfit_layers(config, *_layers(model, config))

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        linears, convs = _layers(model, cfg)
        unfit = unfit_layers(cfg, linears, convs)
        if cfg.output_layers == "dense":
            outputs = set(model.graph.outputs)
            unfit.update({n.name: "feeds a model output (output_layers: dense)" for n in model.graph
                          if n.op_type in cfg.ops and (is_linear(n) or is_conv(n)) and in_scope(n.name, cfg)
                          and feeds_model_output(n, outputs)})
        linears = [n for n in linears if n.name not in unfit]
        convs = {k: v for k, v in convs.items() if k not in unfit}
        if not linears and not convs:
            ctx.reports["sparsify"] = {"layers": 0, "dense": unfit}
            return False
        hessians = {}
        if cfg.method == "sparsegpt":
            hessians, _ = layer_hessians(model, linears, convs, ctx, samples=cfg.samples,
                                         conv_positions=cfg.conv_positions, pass_name="sparsify")
        per_layer = {}
        for node in linears:
            w_kn, transposed = weight_kn(node)
            pruned = self._prune(w_kn, hessians.get(node.inputs[0].name), taps=1)
            node.inputs[1].const_value = stored_tensor((pruned.T if transposed else pruned).astype(np.float32),
                                                       node.inputs[1].name)
            ctx.sparse.put(node.inputs[1].name, cfg.pattern)
            per_layer[node.name] = _layer_record(w_kn, pruned, cfg.pattern, hessians.get(node.inputs[0].name))
        for name, (node, geo) in convs.items():
            w = node.inputs[1].const_value.numpy().astype(np.float64)
            cout, taps = w.shape[0], int(np.prod(w.shape[2:]))
            groups = geo.groups
            h = hessians.get(name)
            pruned = np.empty_like(w)
            per_group = cout // groups
            for g in range(groups):
                w_kn = w[g * per_group:(g + 1) * per_group].reshape(per_group, -1).T      # [Cin/g·taps, Cout/g]
                pruned[g * per_group:(g + 1) * per_group] = \
                    self._prune(w_kn, None if h is None else h[g], taps=taps).T.reshape(per_group, *w.shape[1:])
            node.inputs[1].const_value = stored_tensor(pruned.astype(np.float32), node.inputs[1].name)
            ctx.sparse.put(node.inputs[1].name, cfg.pattern)
            per_layer[name] = _layer_record(w.reshape(cout, -1).T, pruned.reshape(cout, -1).T, cfg.pattern, None)
        total = sum(r["weights"] for r in per_layer.values())
        zeros = sum(r["zeros"] for r in per_layer.values())
        ctx.reports["sparsify"] = {
            "method": cfg.method, "pattern": cfg.pattern, "target_sparsity": cfg.sparsity, "layers": len(per_layer),
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "int8_bytes": {"dense": total, "sparse": sum(r["int8_sparse_bytes"] for r in per_layer.values()),
                           "format": _FORMATS[cfg.pattern]},
            "per_layer": per_layer, "dense": unfit}
        return True

    def _prune(self, w_kn: np.ndarray, h: np.ndarray | None, *, taps: int) -> np.ndarray:
        """W [K, N] pruned; K is channel-major over `taps` kernel taps (1 for a linear), so the
        2:4 groups take 4 consecutive input channels at one tap."""
        cfg = self.config
        order = _channel_order(w_kn.shape[0], taps)            # rows so that 2:4 groups are contiguous
        w = w_kn[order]
        hp = h[np.ix_(order, order)] if h is not None else None
        if cfg.method == "magnitude" or hp is None:
            out = w * magnitude_mask(w, cfg.pattern, cfg.sparsity)
        else:
            out = sparsegpt(w, hp, cfg.pattern, cfg.sparsity, block_size=cfg.block_size, damp=cfg.damp)
        back = np.empty_like(out)
        back[order] = out
        return back


def unfit_layers(config, linears: list[ir.Node], convs: dict) -> dict[str, str]:
    """2:4 groups 4 input channels: a layer whose input channels (Cin per group for a Conv)
    are not a multiple of 4 is refused before any work, named — or, with `skip_unfit`,
    left dense ({layer: why})."""
    if config.pattern != "2:4":
        return {}
    unfit = {}
    for node in linears:
        k = weight_kn(node)[0].shape[0]
        if k % GROUP:
            unfit[node.name] = f"{k} input channels, not a multiple of {GROUP}"
    for name, (node, _) in convs.items():
        cin = node.inputs[1].const_value.shape[1]
        if cin % GROUP:
            unfit[name] = f"{cin} input channels per group, not a multiple of {GROUP}"
    if unfit and not config.skip_unfit:
        name, why = next(iter(unfit.items()))
        more = f" (and {len(unfit) - 1} more)" if len(unfit) > 1 else ""
        raise RecipeError(f"2:4 sparsity groups {GROUP} input channels, but layer {name!r} has {why}{more}",
                          pass_name="sparsify", key="pattern",
                          hint="sparsify.skip_unfit: true leaves such layers dense; or exclude them "
                               "(sparsify.exclude), or use pattern: unstructured")
    return unfit


def _layers(model: ir.Model, cfg) -> tuple[list[ir.Node], dict]:
    """The in-scope linears and 2-D Convs (with their geometry) this pass prunes."""
    outputs = set(model.graph.outputs)
    kept = (lambda n: True) if cfg.output_layers == "prune" else (lambda n: not feeds_model_output(n, outputs))
    linears = [n for n in model.graph if n.op_type in cfg.ops and is_linear(n) and in_scope(n.name, cfg) and kept(n)]
    convs = {}
    for n in model.graph:
        if "Conv" in cfg.ops and is_conv(n) and in_scope(n.name, cfg) and kept(n):
            geo = ConvGeometry.of(n, n.inputs[1].const_value.shape)
            if geo is not None:
                convs[n.name] = (n, geo)
    return linears, convs


_FORMATS = {"2:4": "of every 4 int8 weights along Cin, 2 int8 values + two 2-bit indexes (ATC --sparsity=1)",
            "unstructured": "int8 values of the kept weights + a one-bit mask per weight"}


def _channel_order(k: int, taps: int) -> np.ndarray:
    """Row order of a [Cin·taps, N] patch-layout weight (channel-major) that puts the channels of
    one tap next to each other: tap-major. Identity for a linear (taps = 1)."""
    return np.arange(k).reshape(k // taps, taps).T.reshape(-1)


def magnitude_mask(w: np.ndarray, pattern: str, sparsity: float) -> np.ndarray:
    """Keep-mask of W [K, N] by |w|: the 2 largest of every 4 rows (input channels) per column,
    or the largest (1 - sparsity) fraction of the whole layer."""
    if pattern == "2:4":
        return nm_mask(np.abs(w))
    mask = np.ones(w.size, bool)
    mask[np.argsort(np.abs(w).ravel(), kind="stable")[:int(round(sparsity * w.size))]] = False
    return mask.reshape(w.shape)


def nm_mask(score: np.ndarray) -> np.ndarray:
    """Keep-mask [K, N]: in every group of 4 consecutive rows, per column, the 2 highest scores
    (ties to the lower row)."""
    k, n = score.shape
    groups = score.reshape(k // GROUP, GROUP, n)
    ranks = np.argsort(-groups, axis=1, kind="stable")[:, :KEEP, :]
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, ranks, True, axis=1)
    return mask.reshape(k, n)


def sparsegpt(w: np.ndarray, h: np.ndarray, pattern: str, sparsity: float, *, block_size: int = 128,
              damp: float = 0.01) -> np.ndarray:
    """SparseGPT on W [K, N] (rows = input channels, visited in order) with Hessian H [K, K]."""
    w = np.array(w, dtype=np.float64)
    k = w.shape[0]
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T                        # upper factor of H^-1
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[i1:i2].copy()
        err = np.zeros_like(w1)
        d = np.diag(hinv)[i1:i2][:, None]
        if pattern == "unstructured":
            score = w1 ** 2 / d ** 2
            cut = int(round(sparsity * score.shape[0]))
            keep = np.ones_like(w1, dtype=bool)
            if cut:
                pruned_rows = np.argsort(score, axis=0, kind="stable")[:cut]  # per output channel
                np.put_along_axis(keep, pruned_rows, False, axis=0)
        else:
            keep = None
        for i in range(i2 - i1):
            if pattern == "2:4" and i % GROUP == 0:        # choose the group's 2 from the weights as updated so far
                seg = w1[i:i + GROUP] ** 2 / d[i:i + GROUP] ** 2
                group_keep = nm_mask(seg)
            kept = keep[i] if keep is not None else group_keep[i % GROUP]
            q = np.where(kept, w1[i], 0.0)
            e = (w1[i] - q) / hinv[i1 + i, i1 + i]
            w1[i] = q
            w1[i + 1:] -= np.outer(hinv[i1 + i, i1 + i + 1:i2], e)
            err[i] = e
        w[i1:i2] = w1
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return w


def _layer_record(w: np.ndarray, pruned: np.ndarray, pattern: str, h: np.ndarray | None) -> dict:
    """Per-layer sparsity, stored int8 bytes, and (with a Hessian) the output error the pruning
    leaves on the calibration inputs, tr(ΔᵀHΔ)/tr(WᵀHW)."""
    zeros = int(np.count_nonzero(pruned == 0))
    dense = int(w.size)
    stored = dense * 3 // 4 if pattern == "2:4" else (dense - zeros) + -(-dense // 8)
    record = {"weights": dense, "zeros": zeros, "sparsity": round(zeros / dense, 6), "int8_sparse_bytes": stored}
    if h is not None:
        d = w - pruned
        den = float(np.sum(w * (h @ w)))
        record["output_error"] = round(float(np.sum(d * (h @ d))) / den, 8) if den > 0 else 0.0
    return record
