"""Streaming, mergeable activation statistics and the range methods built on them.

`HistogramObserver` keeps the exact running min/max plus a fixed number of bins
whose width grows by an integer factor when new data falls outside, so old
counts merge exactly into new bins. Memory is O(bins), whatever the number of
samples; two observers merge, so calibration can be sharded across processes.
Percentile, entropy (KL) and MSE-optimal ranges are all read off the histogram.
"""

from __future__ import annotations

import math

import numpy as np

from .numerics import compute_qparams, qrange

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


class HistogramObserver:
    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo = 0.0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0  # inf/-inf/NaN values seen (kept out of the histogram)
        self.channel_sum: np.ndarray | None = None  # per-channel sums, when asked (update_channels)
        self.channel_count = 0
        self.channel_absmax: np.ndarray | None = None  # per-channel max|x| (same request)

    # -- accumulation -------------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        xmin, xmax = float(x.min()), float(x.max())
        if not (math.isfinite(xmin) and math.isfinite(xmax)):  # NaN or ±Inf somewhere
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if x.size == 0:
                return
            xmin, xmax = float(x.min()), float(x.max())
        self._cover(xmin, xmax)
        self.min, self.max = min(self.min, xmin), max(self.max, xmax)
        self.count += x.size
        scaled = np.subtract(x, np.float32(self.lo))
        scaled *= np.float32(1.0 / self.width)
        idx = scaled.astype(np.intp)  # truncation: values sit in [lo, lo + bins*width)
        np.minimum(idx, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _cover(self, lo: float, hi: float) -> None:
        if self.width == 0.0:
            span = hi - lo
            self.width = (span if span > 0 else max(abs(lo), 1e-6) * 1e-3) / self.bins * 1.0001
            self.lo = lo
            return
        old_hi = self.lo + self.bins * self.width
        if lo >= self.lo and hi < old_hi:
            return
        shift = max(0, math.ceil((self.lo - lo) / self.width))  # old bins added on the left
        new_lo = self.lo - shift * self.width
        # the new grid must hold the new data and every old bin
        factor = max(1, math.ceil((self.bins + shift) / self.bins),
                     math.ceil((hi - new_lo) / (self.bins * self.width) * 1.0001))
        while new_lo + self.bins * factor * self.width <= hi:
            factor += 1
        mapping = (np.arange(self.bins) + shift) // factor
        self.counts = np.bincount(mapping, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.lo, self.width = new_lo, self.width * factor

    def merge(self, other: "HistogramObserver") -> None:
        """Fold `other` in (bin centres of `other` land in this grid's bins)."""
        if other.channel_sum is not None:
            self.channel_sum = other.channel_sum.copy() if self.channel_sum is None else self.channel_sum + other.channel_sum
            self.channel_count += other.channel_count
        if other.channel_absmax is not None:
            self.channel_absmax = other.channel_absmax.copy() if self.channel_absmax is None else \
                np.maximum(self.channel_absmax, other.channel_absmax)
        if other.count == 0:
            self.nonfinite += other.nonfinite
            return
        centres = other.lo + (np.arange(other.bins) + 0.5) * other.width
        keep = other.counts > 0
        self._cover(min(other.min, self.min if self.count else other.min),
                    max(other.max, self.max if self.count else other.max))
        idx = np.clip(((centres[keep] - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, weights=other.counts[keep], minlength=self.bins).astype(np.int64)
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    # -- ranges -------------------------------------------------------------------
    @property
    def centres(self) -> np.ndarray:
        return self.lo + (np.arange(self.bins) + 0.5) * self.width

    def update_channels(self, x: np.ndarray, axis: int) -> None:
        """Also accumulate the per-channel sum and max|x| along `axis` (bias correction's E[x_c],
        attention's per-head scales)."""
        x = np.asarray(x, dtype=np.float64)
        axis = axis % x.ndim
        other = tuple(i for i in range(x.ndim) if i != axis)
        finite = np.where(np.isfinite(x), x, 0.0)
        sums = finite.sum(axis=other)
        absmax = np.abs(finite).max(axis=other) if finite.size else np.zeros(x.shape[axis])
        self.channel_absmax = absmax if self.channel_absmax is None else np.maximum(self.channel_absmax, absmax)
        self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
        self.channel_count += x.size // x.shape[axis]

    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count

    def range_measure(self) -> float:
        """max|x| / std(x) from the histogram: how far the extreme values sit from the bulk
        (the seeds' fallback statistic: a tensor with a high one loses most to a per-tensor
        int8 range)."""
        if self.count == 0:
            return 0.0
        c, n = self.centres, self.counts.astype(np.float64)
        mean = float(np.dot(c, n) / n.sum())
        std = float(np.sqrt(max(np.dot((c - mean) ** 2, n) / n.sum(), 0.0)))
        absmax = max(abs(self.min), abs(self.max))
        return absmax / std if std > 0 else float("inf") if absmax > 0 else 0.0

    def range(self, method: str = "minmax", *, percentile: float = 99.999, dtype: str = "uint8",
              symmetric: bool = False) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("observer saw no finite values")
        if method == "minmax":
            return self.min, self.max
        if method == "percentile":
            return self._percentile_range(percentile)
        if method == "entropy":
            return self._entropy_range(dtype)
        if method == "mse":
            return self._mse_range(dtype, symmetric)
        raise ValueError(f"unknown range method {method!r}; known: {', '.join(RANGE_METHODS)}")

    def _percentile_range(self, p: float) -> tuple[float, float]:
        cdf = np.cumsum(self.counts) / self.count
        edges = self.lo + np.arange(1, self.bins + 1) * self.width
        tail = (100.0 - p) / 100.0
        lo = float(edges[np.searchsorted(cdf, tail, side="left")]) - self.width
        hi = float(edges[min(np.searchsorted(cdf, 1.0 - tail, side="left"), self.bins - 1)])
        return max(lo, self.min), min(hi, self.max)

    def _abs_histogram(self) -> tuple[np.ndarray, float]:
        absmax = max(abs(self.min), abs(self.max))
        width = absmax / self.bins if absmax > 0 else 1.0
        idx = np.clip((np.abs(self.centres) / width).astype(np.int64), 0, self.bins - 1)
        return np.bincount(idx, weights=self.counts, minlength=self.bins), width

    def _entropy_range(self, dtype: str) -> tuple[float, float]:
        """TensorRT-style KL-divergence threshold on |x| (symmetric clipping)."""
        hist, width = self._abs_histogram()
        qmin, qmax = qrange(dtype)
        levels = (qmax - qmin + 1) // 2 if self.min < 0 else (qmax - qmin + 1)
        best_kl, best_i = math.inf, self.bins
        for i in range(levels, self.bins + 1, max(1, self.bins // 256)):
            ref = hist[:i].copy()
            ref[-1] += hist[i:].sum()
            if ref.sum() == 0:
                continue
            # Merge i bins into `levels` groups, spread each group's mass over its non-empty bins.
            group = np.minimum((np.arange(i) * levels) // i, levels - 1)
            nonzero = (hist[:i] > 0).astype(np.float64)
            mass = np.bincount(group, weights=hist[:i], minlength=levels)
            support = np.bincount(group, weights=nonzero, minlength=levels)
            cand = np.where(nonzero > 0, (mass / np.maximum(support, 1))[group], 0.0)
            p = ref / ref.sum()
            q = cand / max(cand.sum(), 1e-30)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-30))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        threshold = best_i * width
        return max(self.min, -threshold), min(self.max, threshold)

    def _mse_range(self, dtype: str, symmetric: bool) -> tuple[float, float]:
        """Clip range minimising the histogram-weighted quantization MSE."""
        c, n = self.centres, self.counts.astype(np.float64)
        keep = n > 0
        c, n = c[keep], n[keep]
        fractions = np.linspace(0.02, 1.0, 100)
        lo_c, hi_c = fractions * min(self.min, 0.0), fractions * max(self.max, 0.0)
        best = self._mse_pick(c, n, lo_c, hi_c, dtype, symmetric)
        lo, hi = best
        if not symmetric:  # refine each side on its own around the joint optimum
            for _ in range(2):
                lo = self._mse_pick(c, n, fractions * min(self.min, 0.0), np.full(100, hi), dtype, symmetric)[0]
                hi = self._mse_pick(c, n, np.full(100, lo), fractions * max(self.max, 0.0), dtype, symmetric)[1]
        return lo, hi

    @staticmethod
    def _mse_pick(c, n, lo_c, hi_c, dtype, symmetric):
        scale, zp = compute_qparams(lo_c, hi_c, dtype, symmetric=symmetric)
        qmin, qmax = qrange(dtype)
        s = scale.astype(np.float64)[:, None]
        z = zp.astype(np.float64)[:, None]
        q = np.clip(np.rint(c[None, :] / s) + z, qmin, qmax)
        err = ((q - z) * s - c[None, :]) ** 2  # bins are finer than the quantization step
        total = (err * n[None, :]).sum(axis=1)
        i = int(np.argmin(total))
        return float(lo_c[i]), float(hi_c[i])
