"""gptq: the blocked implementation against a plain column-by-column reference written here,
error reduction against round-to-nearest on the same weights, the quantize pass taking GPTQ's
integers as they are, and the calibration-size check."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import TinyModels
from qcompile.passes.gptq import gptq_quantize
from qcompile.schemes import WeightScheme

INT4_G16 = WeightScheme(dtype="int4", granularity="per_group", group_size=16, full_range=True)
INT8_PC = WeightScheme(dtype="int8", granularity="per_channel")


def correlated(k: int, rows: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    return rng.standard_normal((rows, k)) @ mix * rng.uniform(0.2, 3.0, k)


def reference_gptq(w, h, scheme: WeightScheme, damp=0.01):
    """Column by column, no lazy batching, groups in natural order (the paper's Algorithm 1)."""
    w = w.astype(np.float64).copy()
    k, n = w.shape
    h = h.copy()
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    qmin, qmax = (-8, 7) if scheme.dtype == "int4" else (-127, 127)
    q = np.zeros_like(w)
    g = scheme.group_size if scheme.granularity == "per_group" else k
    s = None
    for j in range(k):
        if j % g == 0:
            block = w[j:j + g]
            if scheme.full_range:
                ext = np.where(np.abs(block.min(0)) >= np.abs(block.max(0)), block.min(0), block.max(0))
                s = np.where(ext != 0, ext / -8.0, 1.0).astype(np.float32).astype(np.float64)
            else:
                s = (np.abs(block).max(0) / qmax).astype(np.float32).astype(np.float64)
        q[j] = np.clip(np.rint(w[j] / s), qmin, qmax)
        e = (w[j] - q[j] * s) / u[j, j]
        w[j + 1:] -= np.outer(u[j, j + 1:], e)
    return q


@pytest.mark.parametrize("scheme,block", [(INT4_G16, 32), (INT4_G16, 16), (INT8_PC, 24)])
def test_blocked_gptq_equals_the_column_by_column_reference(scheme, block):
    x = correlated(64)
    h = 2 * x.T @ x / len(x)
    w = np.random.default_rng(1).standard_normal((64, 12)) * 0.1
    got = gptq_quantize(w, h, scheme, block_size=block)
    if scheme.granularity == "per_channel":  # per-channel scales are fixed up front from the original W
        ref_s = (np.abs(w).max(0) / 127).astype(np.float32)
        np.testing.assert_allclose(got.scale, ref_s, rtol=1e-6)
    want = reference_gptq(w, h, scheme)
    assert np.mean(got.q.astype(np.int64) == want) > 0.995  # equal but for float ties
    assert got.q.dtype == np.int8


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstruction_beats_round_to_nearest(act_order):
    x = correlated(96)
    h = 2 * x.T @ x / len(x)
    w = np.random.default_rng(2).standard_normal((96, 32)) * 0.1

    def err(p):
        deq = p.q.astype(np.float64) * np.repeat(p.scale, p.block, axis=0)[:96]
        return float(np.sum((x @ w - x @ deq) ** 2))

    rtn = gptq_quantize(w, None, INT4_G16)
    gptq = gptq_quantize(w, h, INT4_G16, act_order=act_order)
    assert err(gptq) < 0.7 * err(rtn)
    # groups stay contiguous along K: one scale per 16 rows, as ONNX's block_size needs
    assert gptq.scale.shape == (6, 32) and gptq.block == 16 and gptq.axis == 0


def test_plain_rounding_matches_the_quantize_pass(tmp_path):
    from test_schemes import compile_tiny
    model = TinyModels(0).mlp(64, 32, 8)
    _, qdq, _ = compile_tiny(tmp_path, model, "w4a16", TinyModels.data((64,), 8))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    w = TinyModels.weights(model)["W1"]
    scheme = WeightScheme(dtype="int4", granularity="per_group", group_size=32, full_range=True)
    p = gptq_quantize(w, None, scheme)
    np.testing.assert_array_equal(p.q.astype(np.int64), inits["W1_quantized"].astype(np.int64))
    np.testing.assert_allclose(p.scale, inits["W1_scale"], rtol=1e-7)


def test_w4a16_gptq_recipe_ships_gptq_integers(tmp_path):
    from test_schemes import compile_tiny, run
    model = TinyModels(0).mlp(64, 32, 8)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((96, 64)) @ (np.eye(64) + rng.standard_normal((64, 64)) * 0.3)).astype(np.float32)
    final, qdq, report = compile_tiny(tmp_path, model, "w4a16-gptq", x)
    per_layer = report["gptq"]["per_layer"]
    assert set(per_layer) == {"/fc1/MatMul", "/fc2/MatMul"}
    for rec in per_layer.values():
        assert rec["reconstruction_error"] < rec["rtn_reconstruction_error"]
    assert "MatMulNBits" in [n.op_type for n in final.graph.node]
    (ref,) = run(model, {"x": x})
    (got,) = run(final, {"x": x})
    _, rtn_qdq, _ = compile_tiny(tmp_path, model, "w4a16", x, name="rtn")
    (rtn,) = run(rtn_qdq, {"x": x}, optimize=False)
    assert np.sum((got - ref) ** 2) < np.sum((rtn - ref) ** 2)
    assert not report["warnings"] or all("rank-deficient" not in w for w in report["warnings"])


def test_too_few_calibration_rows_is_a_recipe_error(tmp_path, run_cli):
    model = TinyModels(0).mlp(64, 32, 8)
    path, npz = TinyModels.save(model, tmp_path, "m", TinyModels.data((64,), 8))
    out = tmp_path / "out"
    res = run_cli([path, "--target", "cpu", "--recipe", "w4a16-gptq", "--calib", npz, "-o", out])
    assert res.code == 4 and "key 'samples'" in res.err and "at least 64 samples" in " ".join(res.err.split())
    assert not out.exists()
