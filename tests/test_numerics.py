"""qcompile.numerics against plain-numpy / pure-Python references written here."""

from __future__ import annotations

import decimal
import math

import numpy as np
import pytest

from qcompile.numerics import (compute_qparams, cosine, dequantize, qrange, quantize, round_values,
                               sqnr_db)

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
NP_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16}


# -- independent references -------------------------------------------------------------------
_DEC = decimal.Context(prec=400)  # exact for every finite float64


def _round_half_away(v: float) -> int:
    return int(decimal.Decimal(v).quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_UP, context=_DEC))


REF_ROUND = {
    "half_even": lambda v: round(v),          # Python's round(): ties to even, exact on floats
    "half_away": _round_half_away,            # decimal ROUND_HALF_UP: ties away from zero
    "floor": math.floor,
    "ceil": math.ceil,
    "trunc": math.trunc,
}


def ref_quantize_scalar(x: float, scale: float, zp: int, dtype: str, mode: str) -> int:
    """ONNX QuantizeLinear for one value: x / scale in float32, round, add zp, saturate."""
    qmin, qmax = RANGES[dtype]
    v = float(np.float32(x) / np.float32(scale))
    return min(max(REF_ROUND[mode](v) + zp, qmin), qmax)


def ref_quantize(x: np.ndarray, scale, zp, dtype: str, mode: str, axis: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=NP_TYPES[dtype])
    scale = np.atleast_1d(np.asarray(scale, dtype=np.float32))
    zp = np.atleast_1d(np.asarray(zp)).astype(np.int64)
    for idx in np.ndindex(x.shape):
        c = 0 if axis is None else idx[axis]
        out[idx] = ref_quantize_scalar(float(x[idx]), float(scale[c]), int(zp[c]), dtype, mode)
    return out


# -- qrange / compute_qparams ---------------------------------------------------------------------
def test_qrange_plain_restricted_and_reduced():
    assert qrange("int8") == (-128, 127)
    assert qrange("int8", restricted=True) == (-127, 127)
    assert qrange("uint8") == (0, 255)
    assert qrange("uint8", reduce_range=True) == (0, 127)
    assert qrange("int8", reduce_range=True) == (-64, 63)
    with pytest.raises(ValueError):
        qrange("int4")


@pytest.mark.parametrize("lo,hi", [(-3.0, 1.5), (-0.2, 5.0), (-7.25, 7.25), (0.0, 2.0)])
def test_symmetric_int8_restricted_scale_is_absmax_over_127(lo, hi):
    scale, zp = compute_qparams(lo, hi, "int8", symmetric=True, restricted=True)
    absmax = max(abs(lo), abs(hi))
    assert scale.dtype == np.float32 and zp.dtype == np.int8
    assert float(scale) == pytest.approx(absmax / 127.0, rel=1e-6)
    assert int(zp) == 0
    # the restricted grid reaches +-absmax exactly and never uses -128
    q = quantize(np.array([-absmax, absmax, -10 * absmax], dtype=np.float32), scale, zp, "int8")
    assert q.tolist() == [-127, 127, -128]  # out-of-range input saturates to the int8 minimum
    assert np.allclose(dequantize(q[:2], scale, zp), [-absmax, absmax], rtol=1e-6)


@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (-4.5, 0.75), (-0.01, 10.0)])
def test_asymmetric_uint8_matches_formula(lo, hi):
    scale, zp = compute_qparams(lo, hi, "uint8", symmetric=False)
    ref_scale = (hi - lo) / 255.0
    ref_zp = int(np.clip(np.rint(0 - lo / ref_scale), 0, 255))
    assert scale.dtype == np.float32 and zp.dtype == np.uint8
    assert float(scale) == pytest.approx(ref_scale, rel=1e-6)
    assert int(zp) == ref_zp
    # lo and hi land on the ends of the integer grid (within one step)
    q = quantize(np.array([lo, hi], dtype=np.float32), scale, zp, "uint8")
    assert abs(int(q[0]) - 0) <= 1 and abs(int(q[1]) - 255) <= 1


@pytest.mark.parametrize("lo,hi,expect_lo,expect_hi", [
    (2.0, 10.0, 0.0, 10.0),     # all positive: widened down to 0
    (-10.0, -2.0, -10.0, 0.0),  # all negative: widened up to 0
])
def test_asymmetric_range_is_widened_to_include_zero(lo, hi, expect_lo, expect_hi):
    scale, zp = compute_qparams(lo, hi, "uint8", symmetric=False)
    assert float(scale) == pytest.approx((expect_hi - expect_lo) / 255.0, rel=1e-6)
    assert int(zp) == int(np.rint(-expect_lo / ((expect_hi - expect_lo) / 255.0)))
    # 0.0 is exactly representable
    q0 = quantize(np.zeros(1, np.float32), scale, zp, "uint8")
    assert dequantize(q0, scale, zp)[0] == 0.0


def test_zero_range_gives_a_usable_scale():
    scale, zp = compute_qparams(0.0, 0.0, "uint8", symmetric=False)
    assert np.isfinite(scale) and float(scale) > 0
    assert dequantize(quantize(np.zeros(3, np.float32), scale, zp, "uint8"), scale, zp).tolist() == [0, 0, 0]


def test_per_channel_arrays():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3)).astype(np.float32) * rng.uniform(0.1, 5, (6, 1, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero channel
    lo, hi = w.min(axis=(1, 2)), w.max(axis=(1, 2))
    scale, zp = compute_qparams(lo, hi, "int8", symmetric=True, restricted=True)
    assert scale.shape == (6,) and zp.shape == (6,)
    absmax = np.abs(w).reshape(6, -1).max(axis=1).astype(np.float64)
    nz = absmax > 0
    np.testing.assert_allclose(scale[nz], absmax[nz] / 127.0, rtol=1e-6)
    assert scale[3] > 0 and np.all(zp == 0)

    ascale, azp = compute_qparams(lo, hi, "uint8", symmetric=False)
    lo0, hi0 = np.minimum(lo, 0).astype(np.float64), np.maximum(hi, 0).astype(np.float64)
    ref = (hi0 - lo0) / 255.0
    np.testing.assert_allclose(ascale[nz], ref[nz], rtol=1e-6)
    np.testing.assert_array_equal(azp[nz], np.clip(np.rint(-lo0[nz] / ref[nz]), 0, 255).astype(np.uint8))


def test_symmetric_uint8_uses_midpoint_zero_point():
    scale, zp = compute_qparams(-2.0, 1.0, "uint8", symmetric=True)
    assert int(zp) == 128
    assert float(scale) == pytest.approx(2.0 / 127.0, rel=1e-6)


# -- rounding and quantize ------------------------------------------------------------------------
TIES = np.array([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5], dtype=np.float32)


@pytest.mark.parametrize("mode", list(REF_ROUND))
def test_round_values_matches_reference_on_ties_and_random(mode):
    rng = np.random.default_rng(3)
    x = np.concatenate([TIES, TIES + 0.25, TIES - 0.25, rng.uniform(-100, 100, 200)]).astype(np.float64)
    got = round_values(x, mode)
    ref = np.array([REF_ROUND[mode](float(v)) for v in x], dtype=np.float64)
    np.testing.assert_array_equal(got, ref)


def test_half_away_is_exact_for_float64_values_next_to_a_tie():
    x = np.array([0.49999999999999994, -0.49999999999999994, 2.0**52 + 1, -(2.0**52 + 1)], dtype=np.float64)
    ref = np.array([_round_half_away(float(v)) for v in x], dtype=np.float64)
    np.testing.assert_array_equal(round_values(x, "half_away"), ref)


def test_tie_rules_are_distinct():
    """half_even and half_away must really differ on ties (guards against a shared bug)."""
    even = round_values(TIES.astype(np.float64), "half_even")
    away = round_values(TIES.astype(np.float64), "half_away")
    assert even.tolist() == [-4, -2, -2, 0, 0, 2, 2, 4]
    assert away.tolist() == [-4, -3, -2, -1, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("mode", list(REF_ROUND))
def test_quantize_per_tensor_matches_reference(mode, dtype):
    rng = np.random.default_rng(11)
    scale = np.float32(0.5)  # ties k + 0.5 are exact after x / 0.5
    zp = np.int64(0 if dtype == "int8" else 128)
    qmin, qmax = RANGES[dtype]
    ties = (TIES * scale).astype(np.float32)
    # saturation at both ends, exact range ends, and values just outside
    ends = np.array([(qmin - zp) * scale, (qmax - zp) * scale, (qmin - zp - 1) * scale, (qmax - zp + 1) * scale,
                     -1e6, 1e6, -1e30, 1e30], dtype=np.float32)
    x = np.concatenate([ties, ends, rng.uniform(-80, 80, 300).astype(np.float32)])
    got = quantize(x, scale, np.asarray(zp).astype(NP_TYPES[dtype]), dtype, rounding=mode)
    ref = ref_quantize(x, scale, zp, dtype, mode)
    assert got.dtype == NP_TYPES[dtype]
    np.testing.assert_array_equal(got, ref)
    assert got.min() == qmin and got.max() == qmax


@pytest.mark.parametrize("mode", ["half_even", "half_away"])
def test_quantize_ties_with_nonzero_zero_point(mode):
    scale, zp = np.float32(0.25), np.uint8(100)
    x = np.array([0.125, 0.375, -0.125, -0.375, 0.625], dtype=np.float32)  # v = 0.5, 1.5, -0.5, -1.5, 2.5
    got = quantize(x, scale, zp, "uint8", rounding=mode)
    np.testing.assert_array_equal(got, ref_quantize(x, scale, 100, "uint8", mode))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("mode", list(REF_ROUND))
def test_quantize_per_channel_matches_reference(axis, mode):
    rng = np.random.default_rng(5 + axis)
    x = rng.uniform(-4, 4, (5, 7, 3)).astype(np.float32)
    c = x.shape[axis]
    scale = rng.uniform(0.01, 0.05, c).astype(np.float32)
    zp = rng.integers(-20, 20, c).astype(np.int8)
    got = quantize(x, scale, zp, "int8", axis=axis, rounding=mode)
    np.testing.assert_array_equal(got, ref_quantize(x, scale, zp, "int8", mode, axis=axis))
    # dequantize per channel: (q - zp[c]) * scale[c]
    deq = dequantize(got, scale, zp, axis=axis)
    shape = [1, 1, 1]
    shape[axis] = c
    ref_deq = (got.astype(np.float64) - zp.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)
    np.testing.assert_allclose(deq, ref_deq, rtol=1e-6, atol=0)


def test_quantize_per_channel_saturates_each_channel():
    x = np.array([[1000.0, -1000.0], [1000.0, -1000.0]], dtype=np.float32)
    q = quantize(x, np.array([1.0, 2.0], np.float32), np.array([0, 50], np.uint8), "uint8", axis=0)
    assert q.tolist() == [[255, 0], [255, 0]]


def test_stochastic_rounding_is_reproducible_and_unbiased():
    x = np.full(200_000, 0.3, dtype=np.float32)
    a = quantize(x, 1.0, 0, "int8", rounding="stochastic", rng=np.random.default_rng(42))
    b = quantize(x, 1.0, 0, "int8", rounding="stochastic", rng=np.random.default_rng(42))
    c = quantize(x, 1.0, 0, "int8", rounding="stochastic", rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a).tolist()) == {0, 1}  # only floor or ceil
    # mean of Bernoulli(0.3) over n samples: sd = sqrt(0.21 / n) ~ 0.001; allow 5 sd
    sd = math.sqrt(0.3 * 0.7 / x.size)
    assert abs(float(a.mean()) - 0.3) < 5 * sd
    # unbiased on a spread of values too: E[q] = x / scale
    v = np.random.default_rng(7).uniform(-20, 20, 1000).astype(np.float32)
    reps = np.stack([quantize(v, 0.5, 0, "int8", rounding="stochastic", rng=np.random.default_rng(s))
                     for s in range(400)]).astype(np.float64)
    err = reps.mean(axis=0) - v.astype(np.float64) / 0.5
    assert abs(float(err.mean())) < 5 * 0.5 / math.sqrt(reps.size)  # per-draw sd <= 0.5
    assert np.all(np.abs(err) < 5 * 0.5 / math.sqrt(400))


def test_stochastic_needs_a_generator_and_unknown_mode_is_rejected():
    with pytest.raises(ValueError):
        round_values(np.zeros(3), "stochastic")
    with pytest.raises(ValueError):
        round_values(np.zeros(3), "nearest")


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", False), ("int8", True)])
def test_roundtrip_error_is_at_most_half_a_step_inside_the_range(dtype, symmetric):
    rng = np.random.default_rng(9)
    lo, hi = -2.7, 5.3
    scale, zp = compute_qparams(lo, hi, dtype, symmetric=symmetric, restricted=symmetric)
    s = float(scale)
    qmin, qmax = qrange(dtype, restricted=symmetric)
    # the representable interval; everything inside it must round to the nearest level
    rep_lo, rep_hi = (qmin - int(zp)) * s, (qmax - int(zp)) * s
    x = rng.uniform(max(lo, rep_lo), min(hi, rep_hi), 20_000).astype(np.float32)
    err = np.abs(dequantize(quantize(x, scale, zp, dtype), scale, zp).astype(np.float64) - x.astype(np.float64))
    # s/2 plus float32 representation error of x and of the dequantized value
    assert err.max() <= s / 2 + 4 * np.finfo(np.float32).eps * max(abs(lo), abs(hi))


# -- error metrics ----------------------------------------------------------------------------------
def test_sqnr_db_matches_formula():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((4, 50))
    approx = ref + rng.standard_normal((4, 50)) * 0.01
    expected = 10 * math.log10(float(np.sum(ref ** 2)) / float(np.sum((ref - approx) ** 2)))
    assert sqnr_db(ref, approx) == pytest.approx(expected, rel=1e-12)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(np.zeros(5), np.ones(5)) == -math.inf
    # noise power equal to signal power -> 0 dB; 10x smaller amplitude noise -> 20 dB
    x = np.array([1.0, -1.0, 1.0, -1.0])
    assert sqnr_db(x, np.zeros(4)) == pytest.approx(0.0, abs=1e-12)
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0, abs=1e-9)


def test_cosine_matches_formula():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(300), rng.standard_normal(300)
    expected = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
    assert cosine(a, b) == pytest.approx(expected, rel=1e-12)
    assert cosine(a, 3 * a) == pytest.approx(1.0, abs=1e-12)
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
