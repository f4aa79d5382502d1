"""qcompile.numerics against plain-numpy / pure-Python references written here."""

from __future__ import annotations

import decimal
import math

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.numerics import (DTYPES, FLOAT8_TYPES, INT_TYPES, bits, block_minmax, compute_qparams,
                               dequantize, dynamic_quantize_per_tensor_uint8, dynamic_quantize_per_token, fake_quantize,
                               is_float8, onnx_dtype, qrange, quantize, round_values, to_storage)

RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
NP_TYPES = {"int4": np.int8, "uint4": np.uint8, "int8": np.int8, "uint8": np.uint8, "int16": np.int16}
F8_MAX = {"float8e4m3fn": 448.0, "float8e5m2": 57344.0}
F8_NP = {"float8e4m3fn": ml_dtypes.float8_e4m3fn, "float8e5m2": ml_dtypes.float8_e5m2}


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
    assert qrange("int4") == (-8, 7)
    assert qrange("int4", restricted=True) == (-7, 7)
    assert qrange("uint4") == (0, 15)
    for bad in ("int3", "float8e4m3fn"):  # unknown, and not an integer grid
        with pytest.raises(ValueError):
            qrange(bad)


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


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("mode", list(REF_ROUND))
def test_quantize_per_tensor_matches_reference(mode, dtype):
    rng = np.random.default_rng(11)
    scale = np.float32(0.5)  # ties k + 0.5 are exact after x / 0.5
    qmin, qmax = RANGES[dtype]
    zp = np.int64(0 if qmin < 0 else (qmax + 1) // 2)
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


# -- dtype table: int4/uint4 and float8 -----------------------------------------------------------
def test_dtype_table():
    assert set(DTYPES) == set(INT_TYPES) | set(FLOAT8_TYPES)
    assert [bits(d) for d in ("int4", "uint4", "int8", "uint8", "int16", "int32", "float8e4m3fn", "float8e5m2")] \
        == [4, 4, 8, 8, 16, 32, 8, 8]
    assert onnx_dtype("int4") == ir.DataType.INT4 and onnx_dtype("uint4") == ir.DataType.UINT4
    assert onnx_dtype("float8e4m3fn") == ir.DataType.FLOAT8E4M3FN
    assert onnx_dtype("float8e5m2") == ir.DataType.FLOAT8E5M2
    assert is_float8("float8e5m2") and not is_float8("int4")
    # the table's largest finite values are the ml_dtypes ones
    for name, (max_finite, np_dtype, _) in FLOAT8_TYPES.items():
        assert float(ml_dtypes.finfo(np_dtype).max) == max_finite == F8_MAX[name]


def test_unknown_dtype_is_rejected_everywhere():
    for call in (lambda: quantize(np.zeros(2), 1.0, 0, "int3"), lambda: compute_qparams(-1, 1, "fp8", symmetric=True),
                 lambda: onnx_dtype("int3"), lambda: bits("int3"), lambda: is_float8("int3"),
                 lambda: to_storage(np.zeros(2), "int3")):
        with pytest.raises(ValueError, match="unknown"):
            call()


@pytest.mark.parametrize("dtype", ["int4", "uint4"])
def test_int4_storage_serializes_as_int4_and_round_trips(dtype):
    qmin, qmax = RANGES[dtype]
    q = np.arange(qmin, qmax + 1, dtype=NP_TYPES[dtype])
    q = np.concatenate([q, q[::-1], q[:3]]).reshape(-1)  # odd count: a padded last byte
    tensor = ir.tensor(to_storage(q, dtype))
    assert tensor.dtype == onnx_dtype(dtype)
    proto = ir.to_proto(tensor)
    assert proto.data_type == (TensorProto.INT4 if dtype == "int4" else TensorProto.UINT4)
    assert len(proto.raw_data) == (q.size + 1) // 2  # two per byte
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int64), q.astype(np.int64))
    np.testing.assert_array_equal(ir.from_proto(proto).numpy().astype(np.int64), q.astype(np.int64))
    # and the storage dequantizes like the nibble values it holds
    np.testing.assert_array_equal(dequantize(to_storage(q, dtype), 0.5, 0), dequantize(q, 0.5, 0))


def test_other_storage_is_unchanged():
    q = np.array([1, -2], np.int8)
    assert to_storage(q, "int8").dtype == np.int8 and np.array_equal(to_storage(q, "int8"), q)
    f = np.array([1.5, -2.0], dtype=ml_dtypes.float8_e4m3fn)
    assert to_storage(f, "float8e4m3fn").dtype == f.dtype
    proto = ir.to_proto(ir.tensor(to_storage(f, "float8e4m3fn")))
    assert proto.data_type == TensorProto.FLOAT8E4M3FN
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.float32), [1.5, -2.0])


@pytest.mark.parametrize("lo,hi", [(-3.0, 1.5), (-0.2, 5.0)])
def test_int4_qparams_follow_the_int8_formulas(lo, hi):
    scale, zp = compute_qparams(lo, hi, "int4", symmetric=True, restricted=True)
    assert scale.dtype == np.float32 and zp.dtype == np.int8 and int(zp) == 0
    assert float(scale) == pytest.approx(max(-lo, hi) / 7.0, rel=1e-6)
    scale, zp = compute_qparams(lo, hi, "uint4", symmetric=False)
    ref_scale = (hi - lo) / 15.0
    assert zp.dtype == np.uint8 and float(scale) == pytest.approx(ref_scale, rel=1e-6)
    assert int(zp) == int(np.clip(np.rint(-lo / ref_scale), 0, 15))
    scale, zp = compute_qparams(lo, hi, "uint4", symmetric=True)
    assert int(zp) == 8 and float(scale) == pytest.approx(max(-lo, hi) / 7.0, rel=1e-6)


# -- float8 ---------------------------------------------------------------------------------------
def _f8_grid(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of the format (as float64, exact) and its bit pattern."""
    patterns = np.arange(256, dtype=np.uint8)
    values = patterns.view(F8_NP[name]).astype(np.float64)
    finite = np.isfinite(values)
    return values[finite], patterns[finite]


def ref_quantize_f8(x: np.ndarray, scale: float, name: str) -> np.ndarray:
    """x / scale in float32, saturated to +-max, then the nearest finite float8 value
    (ties to the even bit pattern, i.e. even mantissa), found by search over the grid."""
    values, patterns = _f8_grid(name)
    v = (np.asarray(x, np.float32) / np.float32(scale)).astype(np.float64)
    out = np.empty(v.shape, np.float64)
    for i, t in enumerate(v.ravel()):
        t = min(max(t, -F8_MAX[name]), F8_MAX[name])
        d = np.abs(values - t)
        best = np.flatnonzero(d == d.min())
        if len(best) > 1:
            best = [b for b in best if patterns[b] % 2 == 0]
        out.flat[i] = values[best[0]]
    return out


@pytest.mark.parametrize("name", list(FLOAT8_TYPES))
def test_float8_quantize_matches_grid_search(name):
    values, _ = _f8_grid(name)
    grid = np.unique(values)
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties (float32 holds them exactly)
    rng = np.random.default_rng(21)
    top = F8_MAX[name]
    x = np.concatenate([grid, mids, mids + np.abs(mids) * 1e-6, mids - np.abs(mids) * 1e-6,
                        [top * 1.01, -top * 1.01, top * 1e3, -top * 1e3, 1e30, -1e30],
                        rng.standard_normal(500) * top / 4, rng.standard_normal(200) * grid[grid > 0].min() * 4])
    x = x.astype(np.float32)
    for scale in (1.0, 0.5):  # 0.5: x / scale still exact, so the ties stay ties
        got = quantize(x * np.float32(scale), scale, 0, name)
        assert got.dtype == F8_NP[name]
        assert np.all(np.isfinite(got.astype(np.float64)))  # saturated, never inf/NaN
        np.testing.assert_array_equal(got.astype(np.float64), ref_quantize_f8(x * np.float32(scale), scale, name))


@pytest.mark.parametrize("name", list(FLOAT8_TYPES))
def test_float8_qparams_and_roundtrip(name):
    rng = np.random.default_rng(22)
    w = rng.standard_normal((4, 64)).astype(np.float32) * np.float32([[0.01], [1.0], [30.0], [0.0]])
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale, zp = compute_qparams(lo, hi, name, symmetric=True, restricted=True)
    absmax = np.abs(w).max(axis=1).astype(np.float64)
    np.testing.assert_allclose(scale[:3], absmax[:3] / F8_MAX[name], rtol=1e-6)
    assert scale[3] == 1.0  # zero range
    assert zp.dtype == F8_NP[name] and zp.shape == (4,) and np.all(zp.astype(np.float32) == 0)
    q = quantize(w, scale, zp, name, axis=0)
    # the absmax lands on the largest finite value
    assert np.abs(q.astype(np.float64)).max(axis=1)[:3].tolist() == [F8_MAX[name]] * 3
    deq = dequantize(q, scale, zp, axis=0)
    ref = q.astype(np.float64) * scale.astype(np.float64)[:, None]
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=0)
    # relative error of a float8 value: half an ulp of a 3 (e4m3) or 2 (e5m2) bit mantissa
    mant = 3 if name == "float8e4m3fn" else 2
    big = np.abs(w) > absmax[:, None] / 8  # away from the subnormal range
    assert np.all(np.abs(deq - w)[big] <= np.abs(w)[big] * 2.0 ** -(mant + 1) * 1.0001)


def test_float8_errors():
    with pytest.raises(ValueError, match="symmetric"):
        compute_qparams(-1.0, 2.0, "float8e4m3fn", symmetric=False)
    with pytest.raises(ValueError, match="floor"):
        quantize(np.ones(3), 1.0, 0, "float8e4m3fn", rounding="floor")
    with pytest.raises(ValueError, match="stochastic"):
        quantize(np.ones(3), 1.0, 0, "float8e5m2", rounding="stochastic", rng=np.random.default_rng(0))


# -- blocked (DequantizeLinear-21) ----------------------------------------------------------------
def ref_block_minmax(w: np.ndarray, axis: int, bs: int):
    n = w.shape[axis]
    nb = -(-n // bs)
    shape = list(w.shape)
    shape[axis] = nb
    lo, hi = np.empty(shape, np.float32), np.empty(shape, np.float32)
    for idx in np.ndindex(*shape):
        b = idx[axis]
        vals = []
        for k in range(b * bs, min(n, (b + 1) * bs)):
            full = list(idx)
            full[axis] = k
            vals.append(float(w[tuple(full)]))
        lo[idx], hi[idx] = min(vals), max(vals)
    return lo, hi


@pytest.mark.parametrize("shape,axis,bs", [((40, 3), 0, 16), ((32, 5), 0, 16), ((3, 37), 1, 8), ((3, 37), -1, 8),
                                           ((2, 9, 4), 1, 4), ((5, 2), 0, 7), ((5, 2), 0, 64)])
def test_block_minmax_matches_loops(shape, axis, bs):
    w = np.random.default_rng(sum(shape) + bs).standard_normal(shape).astype(np.float32)
    lo, hi = block_minmax(w, axis, bs)
    rlo, rhi = ref_block_minmax(w, axis % w.ndim, bs)
    assert lo.shape == rlo.shape
    np.testing.assert_array_equal(lo, rlo)
    np.testing.assert_array_equal(hi, rhi)


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8"])
@pytest.mark.parametrize("shape,axis,bs", [((40, 3), 0, 16), ((3, 37), 1, 8), ((2, 11, 3), 1, 4)])
def test_blocked_quantize_and_dequantize_match_loops(dtype, shape, axis, bs):
    rng = np.random.default_rng(len(shape) * 100 + bs)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    lo, hi = block_minmax(x, axis, bs)
    symmetric = dtype != "uint4"
    scale, zp = compute_qparams(lo, hi, dtype, symmetric=symmetric, restricted=symmetric)
    assert scale.shape == lo.shape
    for mode in ("half_even", "floor"):
        got = quantize(x, scale, zp, dtype, axis=axis, block_size=bs, rounding=mode)
        ref = np.empty(shape, NP_TYPES[dtype])
        ref_deq = np.empty(shape, np.float64)
        for idx in np.ndindex(*shape):
            b = list(idx)
            b[axis] = idx[axis] // bs  # the block this element belongs to (partial last block included)
            s, z = float(scale[tuple(b)]), int(zp[tuple(b)])
            ref[idx] = ref_quantize_scalar(float(x[idx]), s, z, dtype, mode)
            ref_deq[idx] = (int(ref[idx]) - z) * s
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_allclose(dequantize(got, scale, zp, axis=axis, block_size=bs), ref_deq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("axis,bs", [(None, None), (0, None), (1, None), (0, 8), (1, 8)])
def test_large_tensors_quantized_in_slices_match_the_reference(monkeypatch, axis, bs):
    """Past SLICE_ELEMENTS a tensor is quantized slice by slice (bounded temporaries on a 7B
    lm_head); each element must still get exactly what QuantizeLinear gives it."""
    import qcompile.numerics as numerics
    monkeypatch.setattr(numerics, "SLICE_ELEMENTS", 50)   # (13, 21) = 273 elements: several slices
    rng = np.random.default_rng(7)
    x = rng.standard_normal((13, 21)).astype(np.float32) * 4
    if bs:
        lo, hi = block_minmax(x, axis, bs)
        scale, zp = compute_qparams(lo, hi, "uint8", symmetric=False)
    elif axis is None:
        scale, zp = np.float32(0.03), np.array(3, np.uint8)
    else:
        scale = rng.uniform(0.01, 0.05, x.shape[axis]).astype(np.float32)
        zp = rng.integers(100, 150, x.shape[axis]).astype(np.uint8)
    got = numerics.quantize(x, scale, zp, "uint8", axis=axis, block_size=bs)
    ref = np.empty(x.shape, np.uint8)
    for idx in np.ndindex(*x.shape):
        if bs:
            b = list(idx)
            b[axis] = idx[axis] // bs
            s, z = scale[tuple(b)], zp[tuple(b)]
        elif axis is None:
            s, z = scale, zp
        else:
            s, z = scale[idx[axis]], zp[idx[axis]]
        ref[idx] = ref_quantize_scalar(float(x[idx]), float(s), int(z), "uint8", "half_even")
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype,symmetric", [("int8", True), ("uint8", False), ("int4", True), ("uint4", False)])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fake_quantize_is_dequantize_of_quantize_bit_for_bit(dtype, symmetric, axis):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 48)) * rng.uniform(0.1, 20, (1, 48))).astype(np.float32)
    x[0, 0], x[1, 1] = 1e30, -1e30                                     # saturating values
    lo, hi = (x.min(), x.max()) if axis is None else (x.min(axis=1 - axis), x.max(axis=1 - axis))
    lo, hi = np.clip(lo, -50, 0), np.clip(hi, 0, 50)
    scale, zp = compute_qparams(lo, hi, dtype, symmetric=symmetric)
    ties = (np.round(x[2:4] / np.float32(np.max(scale))) + 0.5) * np.float32(np.max(scale))
    x[2:4] = ties.astype(np.float32)                                     # values on a rounding tie
    want = dequantize(quantize(x, scale, zp, dtype, axis=axis), scale, zp, axis=axis)
    got = fake_quantize(x, scale, zp, dtype, axis=axis)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_blocked_parameters_of_the_wrong_shape_are_rejected():
    x = np.zeros((40, 3), np.float32)
    with pytest.raises(ValueError, match="expected"):
        quantize(x, np.ones((2, 3), np.float32), np.zeros((2, 3), np.int8), "int4", axis=0, block_size=16)
    with pytest.raises(ValueError, match="axis"):
        quantize(x, np.ones((3, 3), np.float32), np.zeros((3, 3), np.int8), "int4", block_size=16)


def test_stochastic_rounding_int4_blocked_is_reproducible_and_unbiased():
    x = np.full((64, 2), 0.3 * 0.25, np.float32)
    scale, zp = np.full((4, 2), 0.25, np.float32), np.zeros((4, 2), np.int8)
    runs = [quantize(x, scale, zp, "int4", axis=0, block_size=16, rounding="stochastic",
                     rng=np.random.default_rng(s)) for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    many = np.stack([quantize(x, scale, zp, "int4", axis=0, block_size=16, rounding="stochastic",
                              rng=np.random.default_rng(s)) for s in range(300)]).astype(np.float64)
    assert set(np.unique(many).tolist()) == {0, 1}
    assert abs(many.mean() - 0.3) < 5 * math.sqrt(0.21 / many.size)


# -- dynamic (run-time) quantization against onnxruntime ----------------------------------------------
def _ort_run(nodes, inputs, outputs, feeds, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _dynamic_inputs(seed: int, qmax: int = 127) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 40, 33)) * rng.uniform(1e-3, 50, (3, 40, 1))).astype(np.float32)
    x[0, 0] = 0.0                 # an all-zero token: the 1e-12 floor
    x[0, 1] = 1e-20               # a tiny token: the floor again
    x[1, 2, :] = np.float32(0.5)  # one value repeated
    x[2, 3, ::2] *= -1e3          # large outliers
    # tokens of near-ties: absmax 1 makes s = 1/qmax, then x = (k + 0.5) * s and its float32
    # neighbours, where dividing by s and multiplying by 1/s round differently
    s = np.float32(1) / np.float32(qmax)
    k = rng.integers(-qmax, qmax, (30, 32))
    ties = ((k + 0.5) * s).astype(np.float32)
    ties = np.nextafter(ties, np.float32(np.inf) * rng.choice([-1, 1], ties.shape).astype(np.float32))
    x[:, 10:, 0] = 1.0
    x[:, 10:, 1:] = ties
    return x


@pytest.mark.parametrize("dtype,qmax", [("int8", 127), ("int4", 7)])
def test_dynamic_per_token_matches_the_onnx_graph_exactly(dtype, qmax):
    x = _dynamic_inputs(qmax, qmax)
    f = TensorProto.FLOAT
    consts = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
              numpy_helper.from_array(np.array(qmax, np.float32), "qmax"),
              numpy_helper.from_array(np.array(-qmax, np.float32), "qmin"),
              numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Div", ["m", "qmax"], ["s0"]),
             helper.make_node("Max", ["s0", "eps"], ["s"]),
             helper.make_node("Div", ["x", "s"], ["v"]),
             helper.make_node("Round", ["v"], ["r"]),
             helper.make_node("Clip", ["r", "qmin", "qmax"], ["q"])]
    q_ort, s_ort = _ort_run(nodes, [helper.make_tensor_value_info("x", f, list(x.shape))],
                            [helper.make_tensor_value_info("q", f, list(x.shape)),
                             helper.make_tensor_value_info("s", f, [*x.shape[:-1], 1])],
                            {"x": x}, consts)
    q, s = dynamic_quantize_per_token(x, dtype)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == x.shape[:-1] + (1,)
    np.testing.assert_array_equal(s, s_ort)  # bit for bit
    np.testing.assert_array_equal(q.astype(np.float32), q_ort)
    assert q.min() >= -qmax and q.max() <= qmax and s[0, 0, 0] == np.float32(1e-12)


def _dql_near_ties() -> np.ndarray:
    """Range [-1, 1.55], and values next to (k + 0.5) * scale: where x / s, x * (1/s)
    and round(x / s + zp) all give different answers."""
    rng = np.random.default_rng(8)
    s = np.float32(np.float32(2.55) / np.float32(255))
    ties = ((rng.integers(-100, 155, 2000) + 0.5) * s).astype(np.float32)
    ties = np.nextafter(ties, np.float32(np.inf) * rng.choice([-1, 1], ties.shape).astype(np.float32))
    return np.concatenate([[-1.0, 1.55], ties]).astype(np.float32)


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "tiny", "ties"])
def test_dynamic_per_tensor_uint8_matches_dynamicquantizelinear(case):
    x = _dynamic_inputs(3)
    x = {"mixed": x, "positive": np.abs(x) + 0.25, "negative": -np.abs(x) - 0.25,
         "zeros": np.zeros_like(x), "tiny": x * np.float32(1e-30),
         "ties": _dql_near_ties()}[case].astype(np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    q_ort, s_ort, z_ort = _ort_run([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                   [helper.make_tensor_value_info("q", TensorProto.UINT8, list(x.shape)),
                                    helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                                    helper.make_tensor_value_info("z", TensorProto.UINT8, [])], {"x": x})
    q, s, z = dynamic_quantize_per_tensor_uint8(x)
    assert q.dtype == np.uint8 and np.asarray(z).dtype == np.uint8
    assert np.float32(s) == np.float32(s_ort) and int(z) == int(z_ort)
    np.testing.assert_array_equal(q, q_ort)


# -- QuantizeLinear / DequantizeLinear-21 in onnxruntime -----------------------------------------
F8_ONNX = {"float8e4m3fn": TensorProto.FLOAT8E4M3FN, "float8e5m2": TensorProto.FLOAT8E5M2}


@pytest.mark.parametrize("name", list(FLOAT8_TYPES))
def test_float8_quantize_matches_onnxruntime_bit_for_bit(name):
    values, _ = _f8_grid(name)
    grid = np.unique(values)
    rng = np.random.default_rng(31)
    x = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, rng.standard_normal(3000) * F8_MAX[name] / 3,
                        [1e30, -1e30, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    scale = np.float32(0.75)
    x = x * scale
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=1),
             helper.make_node("Cast", ["q"], ["f"], to=TensorProto.FLOAT)]  # float8 outputs do not reach numpy
    consts = [numpy_helper.from_array(np.array(scale), "s"), helper.make_tensor("zp", F8_ONNX[name], [], [0.0])]
    (ort_f,) = _ort_run(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                        [helper.make_tensor_value_info("f", TensorProto.FLOAT, list(x.shape))], {"x": x}, consts)
    got = quantize(x, scale, np.zeros((), F8_NP[name]), name).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), ort_f.view(np.uint32))  # bits: the sign of zero too


@pytest.mark.parametrize("dtype,onnx_type", [("int4", TensorProto.INT4), ("uint4", TensorProto.UINT4),
                                             ("int8", TensorProto.INT8)])
def test_blocked_quantize_and_dequantize_match_onnxruntime(dtype, onnx_type):
    rng = np.random.default_rng(32)
    w = rng.standard_normal((40, 5)).astype(np.float32)  # 40 = 16 + 16 + a partial block of 8
    lo, hi = block_minmax(w, 0, 16)
    symmetric = dtype != "uint4"
    scale, zp = compute_qparams(lo, hi, dtype, symmetric=symmetric, restricted=symmetric)
    q = quantize(w, scale, zp, dtype, axis=0, block_size=16)

    def init(arr, name):
        return ir.to_proto(ir.tensor(arr, name=name))

    out = [helper.make_tensor_value_info("c", TensorProto.INT8 if qrange(dtype)[0] < 0 else TensorProto.UINT8,
                                         [40, 5]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [40, 5])]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0, block_size=16),
             helper.make_node("Cast", ["q"], ["c"], to=out[0].type.tensor_type.elem_type),
             helper.make_node("DequantizeLinear", ["qc", "s", "z"], ["y"], axis=0, block_size=16)]
    consts = [init(w, "w"), init(scale, "s"), init(to_storage(zp, dtype), "z"), init(to_storage(q, dtype), "qc")]
    ort_q, ort_y = _ort_run(nodes, [], out, {}, consts)
    np.testing.assert_array_equal(q, ort_q)
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=0, block_size=16), ort_y)
