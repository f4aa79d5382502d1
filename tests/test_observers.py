"""HistogramObserver: exact min/max and counts under range growth, non-finite values,
merging, and the percentile / entropy / MSE ranges read off the histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompile.numerics import compute_qparams, dequantize, quantize
from qcompile.observers import HistogramObserver


def _edges(obs: HistogramObserver) -> np.ndarray:
    return obs.lo + np.arange(obs.bins + 1, dtype=np.float64) * obs.width


def _reference_counts(obs: HistogramObserver, data: np.ndarray) -> np.ndarray:
    """Bin every value ever seen on the observer's final grid (float64, numpy only)."""
    idx = np.floor((data.astype(np.float64) - obs.lo) / obs.width).astype(np.int64)
    return np.bincount(np.clip(idx, 0, obs.bins - 1), minlength=obs.bins)


def _growing_batches(rng) -> list[np.ndarray]:
    """A first batch, then data far to the left, far to the right, inside, both sides at once."""
    return [
        rng.uniform(0.0, 1.0, 1000),
        rng.uniform(-50.0, -40.0, 300),           # far left of everything so far
        rng.uniform(1000.0, 1001.0, 300),         # far right
        rng.normal(0.0, 1.0, 2000),               # inside
        rng.uniform(-1e4, -9e3, 50),              # much further left
        np.full(20, 0.5),                         # constant, inside
        rng.uniform(3e4, 3.1e4, 10),              # much further right
        np.array([-2e5, 4e5]),                    # both sides in one batch
        rng.normal(5.0, 0.001, 500),              # a narrow spike inside
    ]


def test_min_max_exact_and_old_bins_fit_in_the_new_grid():
    rng = np.random.default_rng(0)
    obs = HistogramObserver(bins=512)
    seen = []
    for batch in _growing_batches(rng):
        batch = batch.astype(np.float32)
        obs.update(batch)
        seen.append(batch)
        data = np.concatenate(seen)
        assert obs.min == float(data.min()) and obs.max == float(data.max())
        assert obs.count == data.size and int(obs.counts.sum()) == data.size
        edges = _edges(obs)
        assert edges[0] <= data.min() and edges[-1] >= data.max()
        # Old counts must have been merged into the new bins that contain them: the
        # histogram equals binning all the data on the final grid (a value sitting exactly
        # on a bin edge may fall either side after float32 arithmetic).
        ref = _reference_counts(obs, data)
        assert int(np.abs(ref - obs.counts).sum()) <= 2 * len(seen)


@pytest.mark.parametrize("seed", range(25))
def test_random_growth_sequences_keep_histogram_consistent(seed):
    rng = np.random.default_rng(100 + seed)
    obs = HistogramObserver(bins=256)
    seen = []
    for _ in range(30):
        centre = rng.normal(0.0, 10 ** rng.uniform(-2, 4))
        spread = 10 ** rng.uniform(-4, 2)
        batch = (centre + spread * rng.standard_normal(int(rng.integers(1, 60)))).astype(np.float32)
        obs.update(batch)
        seen.append(batch)
    data = np.concatenate(seen)
    assert obs.min == float(data.min()) and obs.max == float(data.max())
    assert int(obs.counts.sum()) == data.size == obs.count
    edges = _edges(obs)
    assert edges[0] <= data.min() and edges[-1] >= data.max()
    assert int(np.abs(_reference_counts(obs, data) - obs.counts).sum()) <= 2 * len(seen)


def test_first_batch_constant_then_growth():
    """A ReLU output is often all zeros on the first sample."""
    obs = HistogramObserver(bins=2048)
    obs.update(np.zeros(100, np.float32))
    rng = np.random.default_rng(1)
    later = rng.normal(1.0, 2.0, 5000).astype(np.float32)
    obs.update(later)
    data = np.concatenate([np.zeros(100, np.float32), later])
    assert obs.min == float(data.min()) and obs.max == float(data.max())
    assert int(obs.counts.sum()) == data.size
    assert obs.width < (data.max() - data.min()) / 2048 * 4  # the grid is not absurdly coarse
    assert int(np.abs(_reference_counts(obs, data) - obs.counts).sum()) <= 4


def test_nonfinite_values_are_counted_and_excluded():
    obs = HistogramObserver(bins=256)
    x = np.array([1.0, np.nan, -2.0, np.inf, 3.0, -np.inf, np.nan], dtype=np.float32)
    obs.update(x)
    obs.update(np.array([np.nan, np.inf], dtype=np.float32))  # a batch with nothing finite
    obs.update(np.array([0.5, -0.5], dtype=np.float32))
    assert obs.nonfinite == 6
    assert obs.count == 5 and int(obs.counts.sum()) == 5
    assert obs.min == -2.0 and obs.max == 3.0
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = obs.range(method, percentile=99.0)
        assert math.isfinite(lo) and math.isfinite(hi)


def test_no_finite_values_is_an_error():
    obs = HistogramObserver(bins=256)
    obs.update(np.array([np.nan, np.inf], np.float32))
    assert obs.nonfinite == 2 and obs.count == 0
    with pytest.raises(ValueError):
        obs.range("minmax")


def test_unknown_range_method():
    obs = HistogramObserver(bins=256)
    obs.update(np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError):
        obs.range("median")


def test_memory_does_not_grow():
    rng = np.random.default_rng(2)
    obs = HistogramObserver(bins=300)
    for i in range(200):
        obs.update((rng.standard_normal(257) * (1 + i) + i).astype(np.float32))
        assert obs.counts.shape == (300,)
    assert obs.count == 200 * 257 and int(obs.counts.sum()) == obs.count


def _order_stat_range(data: np.ndarray, p: float) -> tuple[float, float]:
    """The values the histogram percentile approximates: the smallest x with
    F(x) >= tail and the smallest x with F(x) >= 1 - tail (an 'inverted cdf')."""
    x = np.sort(data.astype(np.float64))
    n, tail = x.size, (100.0 - p) / 100.0
    k_lo, k_hi = math.ceil(n * tail), math.ceil(n * (1.0 - tail))
    return float(x[max(k_lo, 1) - 1]), float(x[k_hi - 1])


def test_merge_on_a_shared_grid_is_exact():
    """Shards whose first batch holds the same extremes share one grid: merging them must
    give exactly the histogram of observing everything in one observer."""
    rng = np.random.default_rng(3)
    anchors = np.array([-8.0, 8.0], np.float32)
    shards = [rng.normal(0, 2, 4000).clip(-8, 8).astype(np.float32) for _ in range(3)]
    whole = HistogramObserver(bins=1024)
    parts = [HistogramObserver(bins=1024) for _ in shards]
    whole.update(anchors)
    for part, shard in zip(parts, shards):
        part.update(anchors)
        part.update(shard)
        whole.update(shard)
    whole.update(anchors)
    whole.update(anchors)
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    assert merged.lo == whole.lo and merged.width == whole.width
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.min, merged.max, merged.count) == (whole.min, whole.max, whole.count)
    for p in (99.0, 99.9, 99.99):
        assert merged.range("percentile", percentile=p) == whole.range("percentile", percentile=p)


@pytest.mark.parametrize("seed", range(8))
def test_merge_equals_observing_the_concatenation(seed):
    rng = np.random.default_rng(200 + seed)
    a = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), 10007).astype(np.float32)
    b = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), 9001).astype(np.float32)
    b[:3] = [np.nan, np.inf, -np.inf]
    oa, ob, whole = HistogramObserver(2048), HistogramObserver(2048), HistogramObserver(2048)
    for chunk in np.array_split(a, 7):
        oa.update(chunk)
        whole.update(chunk)
    for chunk in np.array_split(b, 5):
        ob.update(chunk)
        whole.update(chunk)
    oa.merge(ob)
    data = np.concatenate([a, b[3:]])
    assert (oa.min, oa.max) == (whole.min, whole.max) == (float(data.min()), float(data.max()))
    assert oa.count == whole.count == data.size and int(oa.counts.sum()) == data.size
    assert oa.nonfinite == whole.nonfinite == 3
    for p in (99.0, 99.9, 99.99):
        ref_lo, ref_hi = _order_stat_range(data, p)
        (m_lo, m_hi), (w_lo, w_hi) = oa.range("percentile", percentile=p), whole.range("percentile", percentile=p)
        # One observer: the reported edge is within one of its bins of the true value.
        assert ref_lo - whole.width <= w_lo <= ref_lo and ref_hi <= w_hi <= ref_hi + whole.width
        # Merged: one bin of its own grid, plus half a bin of the shard whose bin centres
        # were moved into it (`merge` places other's counts at its bin centres).
        slack = oa.width + ob.width / 2
        assert abs(m_lo - ref_lo) <= slack and abs(m_hi - ref_hi) <= slack
        assert abs(m_lo - w_lo) <= slack + whole.width and abs(m_hi - w_hi) <= slack + whole.width


def test_merge_into_an_empty_observer_and_of_an_empty_one():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, 3000).astype(np.float32)
    full = HistogramObserver(512)
    full.update(x)
    empty = HistogramObserver(512)
    empty.merge(full)
    assert (empty.min, empty.max, empty.count) == (full.min, full.max, full.count)
    nan_only = HistogramObserver(512)
    nan_only.update(np.array([np.nan], np.float32))
    full.merge(nan_only)
    assert full.count == 3000 and full.nonfinite == 1


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_range_vs_numpy(p):
    rng = np.random.default_rng(5)
    data = np.concatenate([rng.normal(1.0, 2.0, 300_000), rng.uniform(-12, 15, 300_000)]).astype(np.float32)
    obs = HistogramObserver(2048)
    for chunk in np.array_split(data, 10):
        obs.update(chunk)
    lo, hi = obs.range("percentile", percentile=p)
    ref_lo, ref_hi = np.percentile(data.astype(np.float64), [100 - p, p])
    assert abs(lo - ref_lo) <= 2 * obs.width
    assert abs(hi - ref_hi) <= 2 * obs.width
    assert obs.min <= lo < hi <= obs.max


def test_percentile_100_is_minmax():
    obs = HistogramObserver(256)
    x = np.random.default_rng(6).standard_normal(1000).astype(np.float32)
    obs.update(x)
    assert obs.range("percentile", percentile=100.0) == (float(x.min()), float(x.max()))


def _heavy_tailed(rng, n=2_000_000):
    x = rng.laplace(0.0, 1.0, n).astype(np.float32)
    x[[10, 5000, 77777, 1_000_001]] = [1000.0, -1200.0, 1500.0, -900.0]  # a few 1000x outliers
    return x


def _fake_quant_mse(x: np.ndarray, lo: float, hi: float) -> float:
    scale, zp = compute_qparams(lo, hi, "uint8", symmetric=False)
    xq = dequantize(quantize(x, scale, zp, "uint8"), scale, zp)
    return float(np.mean((xq.astype(np.float64) - x.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def heavy():
    rng = np.random.default_rng(7)
    x = _heavy_tailed(rng)
    obs = HistogramObserver(2048)
    for chunk in np.array_split(x, 20):
        obs.update(chunk)
    return x, obs


def test_entropy_range_clips_heavy_tail(heavy):
    x, obs = heavy
    lo, hi = obs.range("entropy", dtype="uint8")
    assert obs.min <= lo < 0 < hi <= obs.max
    assert hi < 0.1 * obs.max and -lo < 0.1 * -obs.min
    # the clip keeps the bulk of the distribution
    inside = np.mean((x >= lo) & (x <= hi))
    assert inside > 0.999


@pytest.mark.parametrize("symmetric,dtype", [(False, "uint8"), (True, "int8")])
def test_mse_range_clips_heavy_tail(heavy, symmetric, dtype):
    x, obs = heavy
    lo, hi = obs.range("mse", dtype=dtype, symmetric=symmetric)
    assert obs.min <= lo < 0 < hi <= obs.max
    assert hi < 0.5 * obs.max and -lo < 0.5 * -obs.min


def test_mse_range_is_no_worse_than_min_max_on_the_real_data(heavy):
    """Checked on the data itself with numpy fake-quant, not on the histogram. (min, max)
    is the f = 1 candidate of the search, so an MSE-minimising pick cannot do worse."""
    x, obs = heavy
    lo, hi = obs.range("mse", dtype="uint8", symmetric=False)
    assert _fake_quant_mse(x, lo, hi) <= _fake_quant_mse(x, obs.min, obs.max)


def test_ranges_of_a_light_tailed_distribution_stay_near_min_max():
    """Uniform data has no tail to clip: every method keeps (almost) the whole range."""
    x = np.random.default_rng(8).uniform(-3.0, 5.0, 200_000).astype(np.float32)
    obs = HistogramObserver(2048)
    obs.update(x)
    for method in ("percentile", "mse"):
        lo, hi = obs.range(method, percentile=99.99, dtype="uint8")
        assert obs.min <= lo and hi <= obs.max
        assert hi > 0.9 * obs.max and lo < 0.9 * obs.min
