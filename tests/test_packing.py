"""qcompile.packing against pure-Python loop references, onnx's own INT4 tensors,
onnxruntime's MatMulNBits kernel and onnxruntime's own weight packers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.numerics import block_minmax, compute_qparams, dequantize, full_range_qparams, quantize, to_storage
from qcompile.packing import matmulnbits_pack, matmulnbits_unpack, pack_int4, unpack_int4


# -- independent references -------------------------------------------------------------------
def ref_pack_int4(values) -> bytes:
    out = bytearray((len(values) + 1) // 2)
    for i, v in enumerate(values):
        out[i // 2] |= (int(v) & 0xF) << (4 * (i % 2))
    return bytes(out)


def ref_matmulnbits(q, scale, zp, bits: int, bs: int, signed: bool):
    """B[n][block][byte] and scales[n * n_blocks + block], element by element:
    code = q + 2^(bits-1) if signed; 4-bit: even k of a block in the low nibble;
    positions past K hold the block's (shifted) zero point."""
    k_dim, n_dim = q.shape
    nb = -(-k_dim // bs)
    off = 1 << (bits - 1) if signed else 0
    blob = bs * bits // 8
    b = [[[0] * blob for _ in range(nb)] for _ in range(n_dim)]
    scales = [0.0] * (n_dim * nb)
    zps = [[0] * nb for _ in range(n_dim)]
    for n in range(n_dim):
        for blk in range(nb):
            z = (0 if zp is None else int(zp[blk, n])) + off
            zps[n][blk] = z
            scales[n * nb + blk] = float(scale[blk, n])
            for j in range(bs):
                k = blk * bs + j
                code = int(q[k, n]) + off if k < k_dim else z
                if bits == 8:
                    b[n][blk][j] = code
                else:
                    b[n][blk][j // 2] |= code << (4 * (j % 2))
    return np.array(b, np.uint8), np.array(scales, np.float32), zps


# -- ONNX INT4 layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 33])
def test_pack_unpack_round_trip(count, signed):
    rng = np.random.default_rng(count)
    lo, hi = (-8, 7) if signed else (0, 15)
    v = rng.integers(lo, hi + 1, count).astype(np.int8 if signed else np.uint8)
    if count >= 2:
        v[:2] = (lo, hi)
    packed = pack_int4(v)
    assert packed.dtype == np.uint8 and packed.shape == ((count + 1) // 2,)
    assert packed.tobytes() == ref_pack_int4(v.tolist())
    back = unpack_int4(packed, count, signed=signed)
    assert back.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(back, v)


def test_pack_int4_flattens_and_checks_range():
    v = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    assert pack_int4(v).tobytes() == ref_pack_int4(v.ravel().tolist())
    with pytest.raises(ValueError, match="4-bit"):
        pack_int4(np.array([16]))
    with pytest.raises(ValueError, match="4-bit"):
        pack_int4(np.array([-9]))
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(2, np.uint8), 5, signed=True)


@pytest.mark.parametrize("dtype,onnx_type", [("int4", TensorProto.INT4), ("uint4", TensorProto.UINT4)])
def test_pack_int4_is_what_onnx_writes(dtype, onnx_type):
    rng = np.random.default_rng(1)
    lo, hi = (-8, 7) if dtype == "int4" else (0, 15)
    q = rng.integers(lo, hi + 1, (3, 5))  # 15 elements: odd
    # onnx.helper packs a value list for INT4 tensors itself (into int32_data, one byte each)
    made = helper.make_tensor("t", onnx_type, q.shape, q.ravel().tolist())
    assert bytes(made.int32_data) == pack_int4(q).tobytes()
    # onnx_ir writes raw_data from ml_dtypes storage
    assert ir.to_proto(ir.tensor(to_storage(q, dtype))).raw_data == pack_int4(q).tobytes()
    # and onnx reads our bytes back as the values
    raw = helper.make_tensor("t", onnx_type, q.shape, pack_int4(q).tobytes(), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(raw).astype(np.int64), q)


# -- MatMulNBits layout ---------------------------------------------------------------------------
def _blocked_weight(k: int, n: int, bs: int, bits: int, signed: bool, seed: int):
    """A [K, N] weight quantized blockwise along K (axis 0) with qcompile.numerics."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    dtype = ("int" if signed else "uint") + str(bits)
    lo, hi = block_minmax(w, 0, bs)
    scale, zp = compute_qparams(lo, hi, dtype, symmetric=signed, restricted=signed)
    return quantize(w, scale, zp, dtype, axis=0, block_size=bs), scale, zp


def _ort_matmulnbits(packed: dict, a: np.ndarray) -> np.ndarray:
    def init(name, arr, onnx_type):
        return helper.make_tensor(name, onnx_type, arr.shape, arr.tobytes(), raw=True)

    inits = [init("B", packed["B"], TensorProto.UINT8), init("scales", packed["scales"], TensorProto.FLOAT)]
    if packed["zero_points"] is not None:
        inits.append(init("zero_points", packed["zero_points"], TensorProto.UINT8))
    node = helper.make_node("MatMulNBits", ["A", *[t.name for t in inits]], ["Y"], domain="com.microsoft",
                            K=packed["K"], N=packed["N"], bits=packed["bits"], block_size=packed["block_size"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], packed["N"]])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


CASES = [(bits, signed, k, bs) for bits in (4, 8) for signed in (True, False)
         for k, bs in ((64, 16), (40, 16), (17, 16), (96, 32))]


@pytest.mark.parametrize("bits,signed,k,bs", CASES)
def test_matmulnbits_pack_matches_loop_reference(bits, signed, k, bs):
    q, scale, zp = _blocked_weight(k, 5, bs, bits, signed, seed=k + bits)
    packed = matmulnbits_pack(q, scale, None if signed else zp, bits=bits, block_size=bs, signed=signed)
    ref_b, ref_scales, ref_zps = ref_matmulnbits(q, scale, None if signed else zp, bits, bs, signed)
    nb = -(-k // bs)
    assert packed["B"].dtype == np.uint8 and packed["B"].shape == (5, nb, bs * bits // 8)
    np.testing.assert_array_equal(packed["B"], ref_b)
    assert packed["scales"].dtype == np.float32 and packed["scales"].shape == (5 * nb,)
    np.testing.assert_array_equal(packed["scales"], ref_scales)
    assert (packed["K"], packed["N"], packed["bits"], packed["block_size"]) == (k, 5, bits, bs)
    if signed:
        assert packed["zero_points"] is None  # the kernel's default 2^(bits-1) is the shift
    elif bits == 8:
        np.testing.assert_array_equal(packed["zero_points"], np.array(ref_zps, np.uint8).ravel())
    else:  # per row n: ceil(n_blocks / 2) bytes, low nibble first, odd count padded with 8
        rows = [ref_pack_int4(r + [8] * (len(r) % 2)) for r in ref_zps]
        assert packed["zero_points"].tobytes() == b"".join(rows)
        assert packed["zero_points"].shape == (5 * -(-nb // 2),)
    # unpack inverts it
    q_u, s_u, z_u = matmulnbits_unpack(packed)
    off = 1 << (bits - 1) if signed else 0
    np.testing.assert_array_equal(q_u.astype(np.int64), q.astype(np.int64) + off)
    np.testing.assert_array_equal(s_u, scale)
    np.testing.assert_array_equal(z_u.astype(np.int64), zp.astype(np.int64) + off)


@pytest.mark.parametrize("bits,signed,k,bs", CASES)
def test_matmulnbits_runs_in_onnxruntime(bits, signed, k, bs):
    q, scale, zp = _blocked_weight(k, 7, bs, bits, signed, seed=3 * k + bits)
    packed = matmulnbits_pack(q, scale, None if signed else zp, bits=bits, block_size=bs, signed=signed)
    a = np.random.default_rng(k).standard_normal((4, k)).astype(np.float32)
    ref = a.astype(np.float64) @ dequantize(q, scale, zp, axis=0, block_size=bs).astype(np.float64)
    got = _ort_matmulnbits(packed, a)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_signed_weight_with_a_zero_point_keeps_its_zero_points():
    q, scale, _ = _blocked_weight(40, 3, 16, 4, True, seed=9)
    zp = np.random.default_rng(9).integers(-2, 3, scale.shape).astype(np.int8)
    q = np.clip(q.astype(np.int64) + np.repeat(zp, 16, axis=0)[:40], -8, 7).astype(np.int8)
    packed = matmulnbits_pack(q, scale, zp, bits=4, block_size=16, signed=True)
    assert packed["zero_points"] is not None
    a = np.random.default_rng(1).standard_normal((2, 40)).astype(np.float32)
    ref = a.astype(np.float64) @ dequantize(q, scale, zp, axis=0, block_size=16).astype(np.float64)
    np.testing.assert_allclose(_ort_matmulnbits(packed, a), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_matmulnbits_rejects_bad_parameters():
    q, scale, zp = _blocked_weight(64, 2, 16, 4, False, seed=0)
    for bs in (8, 24, 0):
        with pytest.raises(ValueError, match="power of two >= 16"):
            matmulnbits_pack(q, scale, zp, bits=4, block_size=bs, signed=False)
    with pytest.raises(ValueError, match="bits"):
        matmulnbits_pack(q, scale, zp, bits=3, block_size=16, signed=False)
    with pytest.raises(ValueError, match="expected"):
        matmulnbits_pack(q, scale[:2], zp, bits=4, block_size=16, signed=False)
    with pytest.raises(ValueError, match="range"):
        matmulnbits_pack(q.astype(np.int64) + 16, scale, zp, bits=4, block_size=16, signed=False)


# -- byte for byte against onnxruntime's own packers ------------------------------------------------
def _ort_packer(name: str):
    """One of onnxruntime's packers (private API: skip where a build lacks it)."""
    fn = getattr(pytest.importorskip("onnxruntime.capi._pybind_state"), name, None)
    if fn is None:
        pytest.skip(f"onnxruntime has no {name}")
    return fn


def ort_blockwise_codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, bs: int) -> np.ndarray:
    """How onnxruntime's MatMulNBits packer rounds (MLAS): clamp(roundf(x * (1/s) + zp)) in
    float32, roundf ties away from zero, the zero point added before rounding. ONNX's
    QuantizeLinear is round_half_even(x / s) + zp: the two differ next to ties."""
    k = w.shape[0]
    s = np.repeat(scale, bs, axis=0)[:k]
    z = np.repeat(zp, bs, axis=0)[:k].astype(np.float32)
    recip = np.where(s != 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    t = ((w * recip).astype(np.float32) + z).astype(np.float64)
    return np.clip(np.sign(t) * np.floor(np.abs(t) + 0.5), 0, (1 << bits) - 1).astype(np.int64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 40])
def test_matmulnbits_pack_matches_onnxruntime_packer(bits, symmetric, k):
    """onnxruntime picks the scales (its symmetric ones can be negative: the value of
    largest magnitude maps to -2^(bits-1)) and rounds its own way; its codes packed
    by qcompile must be its bytes, and qcompile's ONNX rounding may differ only next
    to a tie."""
    fn = _ort_packer(f"quantize_matmul_{bits}bits")
    n, bs = 6, 16
    nb = -(-k // bs)
    w = np.random.default_rng(k + bits).standard_normal((k, n)).astype(np.float32)
    ort_b = np.zeros((n, nb, bs * bits // 8), np.uint8)
    ort_zp = np.zeros((n, -(-nb // (8 // bits))), np.uint8)
    ort_scales = np.zeros((n, nb), np.float32)
    fn(ort_b, np.pad(w, ((0, nb * bs - k), (0, 0))), ort_scales, ort_zp, bs, n, k, symmetric)
    scale = np.ascontiguousarray(ort_scales.T)
    mid = 1 << (bits - 1)
    if symmetric:
        dtype, zp, shift = f"int{bits}", np.zeros((nb, n), np.int64), mid
    else:
        dtype, shift = f"uint{bits}", 0
        zp = (np.stack([ort_zp & 0xF, ort_zp >> 4], -1).reshape(n, -1)[:, :nb] if bits == 4 else ort_zp).T
    codes = ort_blockwise_codes(w, scale, zp + shift, bits, bs) - shift
    packed = matmulnbits_pack(codes, scale, None if symmetric else zp, bits=bits, block_size=bs, signed=symmetric)
    np.testing.assert_array_equal(packed["scales"], ort_scales.ravel())
    if symmetric:
        assert packed["zero_points"] is None
    else:
        assert packed["zero_points"].tobytes() == ort_zp.tobytes()
    if k % bs == 0:
        assert packed["B"].tobytes() == ort_b.tobytes()
    else:
        # past K onnxruntime leaves 0; qcompile writes the last block's zero point (dequantizes to 0)
        def codes_of(b):
            return (np.stack([b & 0xF, b >> 4], -1) if bits == 4 else b).reshape(n, nb * bs).astype(np.int64)
        ours, theirs = codes_of(packed["B"]), codes_of(ort_b)
        np.testing.assert_array_equal(ours[:, :k], theirs[:, :k])
        assert np.all(theirs[:, k:] == 0)
        assert np.all(ours[:, k:] == (zp[-1].astype(np.int64) + shift)[:, None])
    # qcompile's own quantize (ONNX rounding) agrees but next to ties
    q = quantize(w, scale, zp, dtype, axis=0, block_size=bs).astype(np.int64)
    diff = q != codes
    assert np.all(np.abs(q - codes) <= 1)
    v = (w / np.repeat(scale, bs, axis=0)[:k]).astype(np.float64)
    assert np.all(np.abs(np.abs(v - np.floor(v)) - 0.5)[diff] < 1e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_full_range_qparams_are_onnxruntimes_symmetric_scales(bits):
    """numerics.full_range_qparams is the convention of onnxruntime's symmetric blockwise
    packer: scale = (end of largest magnitude) / qmin, sign included, zero point 0."""
    fn = _ort_packer(f"quantize_matmul_{bits}bits")
    k, n, bs = 40, 6, 16
    nb = -(-k // bs)
    w = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    w[:16, 0] = np.abs(w[:16, 0])  # a block whose extreme is positive: a negative scale
    ort_scales = np.zeros((n, nb), np.float32)
    fn(np.zeros((n, nb, bs * bits // 8), np.uint8), np.pad(w, ((0, nb * bs - k), (0, 0))), ort_scales,
       np.zeros((n, nb), np.uint8), bs, n, k, True)
    lo, hi = block_minmax(w, 0, bs)
    scale, zp = full_range_qparams(lo, hi, f"int{bits}")
    np.testing.assert_array_equal(scale, ort_scales.T)
    assert scale[0, 0] < 0 and np.all(zp == 0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n", [(64, 6), (40, 5), (33, 3)])
def test_pack_int4_matches_onnxruntime_qdq_packer(symmetric, k, n):
    """onnxruntime's QDQ int4 packer writes the ONNX INT4 [K, N] layout with
    blocked [ceil(K/bs), N] scales: the same as qcompile's blocked quantize + pack_int4."""
    fn = _ort_packer("quantize_qdq_matmul_4bits")
    bs = 16
    nb = -(-k // bs)
    w = np.random.default_rng(k).standard_normal((k, n)).astype(np.float32)
    ort_q = np.zeros((k * n + 1) // 2, np.uint8)
    ort_zp = np.zeros((n * nb + 1) // 2, np.uint8)
    scale = np.zeros((nb, n), np.float32)
    fn(ort_q, w, scale, ort_zp, bs, n, k, symmetric)
    dtype = "int4" if symmetric else "uint4"
    zp = np.zeros((nb, n), np.int8) if symmetric else unpack_int4(ort_zp, nb * n, signed=False).reshape(nb, n)
    q = quantize(w, scale, zp, dtype, axis=0, block_size=bs)
    assert pack_int4(q).tobytes() == ort_q.tobytes()
    assert pack_int4(zp).tobytes() == ort_zp.tobytes()
