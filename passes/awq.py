"""awq: activation-aware weight quantization (AWQ, Lin et al. 2024) for weight-only schemes.

For each group of linears sharing an input X (found and folded exactly as smooth_quant does:
into a LayerNorm/RMSNorm γ/β, a producing linear, or an explicit Mul), input channel j's
weights are scaled by s_j = mean|X_j|^α (normalised to a geometric mean of 1) and X by 1/s_j,
which leaves X·W unchanged in float but gives the channels that carry large activations more
of the int4 grid. α is searched on a grid: each candidate's error ‖X·W − (X/s)·Q(s·W)‖² on
calibration rows, with Q the recipe's weight scheme, and α = 0 (no scaling) always a
candidate. Then, per weight group and output channel, the clipping range is searched
(max |w| × r for r from 1 down to `min_clip`), minimising the group's output error
dᵀ·H_g·d with H_g = X_gᵀX_g, and the weights are clamped to it, so that `quantize` (same
scheme, round-to-nearest) lands on the chosen grid. Run it before `quantize`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.numerics import compute_qparams, full_range_qparams, qrange
from qcompile.qdq import set_constant_input
from qcompile.registry import QPass, register_pass
from qcompile.schemes import WeightScheme, builtin_scheme, mixable_schemes

from .equalization.groups import find_groups, fold_division
from .equalization.stats import channel_stat_groups
from .scope import feeds_model_output


@register_pass("awq")
class AWQ(QPass):
    """AWQ: activation-aware per-channel weight scales and clipping search for weight-only quantization."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        weight: WeightScheme = WeightScheme(dtype="int4", granularity="per_group", group_size=32, full_range=True)
        alpha_steps: int = 20              # alpha in {0, 1/n, ..., 1}
        clip: bool = True
        min_clip: float = 0.5              # smallest clipping ratio tried
        kinds: tuple[Literal["norm-linear", "linear-linear", "gated-linear"], ...] = \
            ("norm-linear", "linear-linear", "gated-linear")
        explicit_mul: bool = True          # where no producer absorbs 1/s: a Mul in front of the group
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 64
        rows: int = 1024
        # the scheme the later quantize step gives the layers feeding a model output
        # (`output_layers` there): their groups are left to it, not searched for this scheme
        output_layers: str | None = None

        def validate(self):
            problem = at_least(self, alpha_steps=1)
            if problem:
                return problem
            if not 0.0 < self.min_clip <= 1.0:
                return "min_clip", f"must be in (0, 1], got {self.min_clip}"
            if self.output_layers is not None:
                try:
                    builtin_scheme(self.output_layers)
                except KeyError:
                    return "output_layers", f"unknown scheme {self.output_layers!r}; one of: {', '.join(mixable_schemes())}"
            if self.weight.granularity != "per_group" or self.weight.dtype not in ("int4", "int8"):
                return "weight", "AWQ searches per-group int4/int8 weight scales (weight.granularity: per_group)"
            return at_least(self, rows=16)

    GIVES = frozenset({Fact.WEIGHTS_ROUNDED})
    INVALIDATES = FLOAT_MODEL_CHANGED

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        groups = find_groups(model, cfg)
        records = {g.x.name: {"linears": [lin.node.name for lin in g.linears], "kind": g.kind,
                              "status": "skipped", "reason": g.reason} for g in groups}
        outputs = set(model.graph.outputs)
        if cfg.output_layers is not None:
            for g in groups:
                if g.kind is not None and any(feeds_model_output(lin.node, outputs) for lin in g.linears):
                    g.kind = None
                    records[g.x.name]["reason"] = f"an output layer: quantize gives it {cfg.output_layers} (output_layers)"
        usable = [g for g in groups if g.kind is not None]
        if not usable:
            ctx.reports["awq"] = {"groups": records, "scaled": 0}
            return False
        scaled, clipped_any = 0, False
        # all groups at once, or under --max-memory each block's as soon as its rows are complete
        for ranges, rows in channel_stat_groups(model, [g.x for g in usable], ctx, samples=cfg.samples, rows=cfg.rows,
                                                label="awq"):
            n, clipped = self._scale(model, [g for g in usable if g.x.name in ranges], rows, records)
            scaled, clipped_any = scaled + n, clipped_any or clipped
        ctx.reports["awq"] = {"groups": records, "scaled": scaled, "scheme": cfg.weight.label()}
        return bool(scaled) or clipped_any

    def _scale(self, model: ir.Model, groups: list, rows: dict, records: dict) -> tuple[int, bool]:
        """Search each group's scales (and clipping) on its sampled rows and fold them in:
        (groups scaled, whether any weight was clipped)."""
        cfg, ctx = self.config, self.ctx
        scaled, clipped_any = 0, False
        for g in groups:
            rec = records[g.x.name]
            x = rows[g.x.name].astype(np.float64)
            weights = [_as_kn(lin) for lin in g.linears]
            if any(w.shape[0] != x.shape[1] for w in weights):
                rec["reason"] = "channel count of X differs from the weights'"
                continue
            xmean = np.abs(x).mean(axis=0)
            errors = {}
            for step in range(cfg.alpha_steps + 1):
                alpha = step / cfg.alpha_steps
                s = _awq_scales(xmean, alpha)
                errors[alpha] = _weight_error(x, weights, s, cfg.weight)
            alpha = min(errors, key=errors.get)
            s = _awq_scales(xmean, alpha)
            rec.update({"alpha": alpha, "error_before": round(errors[0.0], 8), "error_after": round(errors[alpha], 8)})
            if alpha > 0:
                for w, lin in zip(weights, g.linears):
                    _store_kn(model.graph, lin, w * s[:, None])
                fold_division(model.graph, g, s.astype(np.float32))
                if g.kind != "explicit-mul":
                    for tensor in g.rescaled():
                        ctx.rescales.note(tensor.name, g.channel_axis, s)
                rec.update({"status": "scaled", "reason": ""})
                scaled += 1
            else:
                rec["reason"] = "no alpha > 0 lowers the weight-quantization error"
            if cfg.clip:
                xs = x / s
                ratios, errs = [], []
                for w_orig, lin in zip(weights, g.linears):
                    clipped, r = _clip_search(xs, _as_kn(lin), cfg.weight, cfg.min_clip)
                    _store_kn(model.graph, lin, clipped)
                    clipped_any = clipped_any or bool(np.any(r < 1.0))
                    ratios.append(float(np.mean(r)))
                    ref = x @ w_orig
                    err = ref - xs @ _fake_quant_groups(clipped, cfg.weight)
                    errs.append(float(np.sum(err * err)) / max(float(np.sum(ref * ref)), 1e-30))
                rec["mean_clip_ratio"] = round(float(np.mean(ratios)), 4)
                rec["error_after_clip"] = round(float(np.mean(errs)), 8)
        return scaled, clipped_any


def _as_kn(lin) -> np.ndarray:
    """The linear's weight as [K, N] float64."""
    w = lin.weight.const_value.numpy().astype(np.float64)
    return w if lin.k_axis == 0 else w.T


def _store_kn(graph: ir.Graph, lin, w_kn: np.ndarray) -> None:
    w = w_kn if lin.k_axis == 0 else w_kn.T
    set_constant_input(graph, lin.node, 1, np.ascontiguousarray(w).astype(np.float32))


def _awq_scales(xmean: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(xmean, 1e-8), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4)


def _fake_quant_groups(w: np.ndarray, scheme: WeightScheme) -> np.ndarray:
    """Per-group (along K) round-to-nearest of W [K, N], as the quantize pass computes it."""
    k, n = w.shape
    g = scheme.group_size
    pad = (-k) % g
    wp = np.concatenate([w, np.zeros((pad, n))]) if pad else w
    blocks = wp.reshape(-1, g, n)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    if scheme.full_range:
        scale, _ = full_range_qparams(lo, hi, scheme.dtype)
        qmin, qmax = qrange(scheme.dtype)
    else:
        scale, _ = compute_qparams(lo, hi, scheme.dtype, symmetric=True, restricted=True)
        qmin, qmax = qrange(scheme.dtype, restricted=True)
    scale = scale.astype(np.float64)[:, None, :]
    q = np.clip(np.rint(blocks / scale), qmin, qmax) * scale
    return q.reshape(-1, n)[:k]


def _weight_error(x, weights, s, scheme) -> float:
    """Mean relative ‖X·W − (X/s)·Q(s·W)‖² over the group's linears."""
    xs = x / s
    errs = []
    for w in weights:
        ref = x @ w
        got = xs @ _fake_quant_groups(w * s[:, None], scheme)
        den = float(np.sum(ref * ref))
        errs.append(float(np.sum((ref - got) ** 2)) / den if den > 0 else 0.0)
    return float(np.mean(errs))


def _clip_search(x: np.ndarray, w: np.ndarray, scheme: WeightScheme, min_clip: float):
    """Per group and output channel, the clip ratio r minimising dᵀH_g d; returns (clamped W, ratios)."""
    k, n = w.shape
    g = scheme.group_size
    best = w.copy()
    ratios = np.ones(((k + g - 1) // g, n))
    for gi, start in enumerate(range(0, k, g)):
        wg = w[start:start + g]
        xg = x[:, start:start + g]
        h = xg.T @ xg
        amax = np.abs(wg).max(axis=0)
        best_err = np.full(n, np.inf)
        for r in np.arange(1.0, min_clip - 1e-9, -0.05):
            clipped = np.clip(wg, -amax * r, amax * r)
            d = wg - _fake_quant_groups(clipped, dataclasses.replace(scheme, group_size=wg.shape[0]))
            err = np.sum(d * (h @ d), axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            ratios[gi] = np.where(better, r, ratios[gi])
            best[start:start + g] = np.where(better[None, :], clipped, best[start:start + g])
    return best, ratios
