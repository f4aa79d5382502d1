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


@pytest.mark.parametrize("k,block", [(1, 4), (7, 3), (300, 64), (300, 256)])
def test_the_upper_cholesky_factor_of_the_inverse_is_numpys(k, block):
    """gptq's H⁻¹ factor without forming H⁻¹ (two [K, K] arrays, not five): numpy's inv + cholesky."""
    from qcompile.passes.gptq import upper_cholesky_of_inverse
    x = correlated(k, rows=3 * k + 5, seed=k)
    h = 2 * x.T @ x / len(x) + 0.01 * np.eye(k)
    got = upper_cholesky_of_inverse(h.copy(), block=block)
    want = np.linalg.cholesky(np.linalg.inv(h)).T
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(got.T @ got, np.linalg.inv(h), rtol=1e-8, atol=1e-12 * np.abs(want).max() ** 2)


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


# -- Conv ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", [dict(strides=[2, 2], pads=[1, 0, 2, 1], group=1),
                                      dict(dilations=[2, 2], pads=[2, 2, 2, 2], group=2),
                                      dict(pads=[1, 1, 1, 1], group=4)])
def test_conv_patches_times_the_weight_are_the_conv_output(geometry):
    """Every output position's patch, times the group's flattened weight, is onnxruntime's Conv output."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from conftest import ort_run_batched
    from qcompile.passes.conv_patches import ConvGeometry, grouped_gram, sampled_patches
    rng = np.random.default_rng(0)
    groups = geometry["group"]
    w = rng.standard_normal((8, 4 // groups, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 10)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], **geometry)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ref = ort_run_batched(model, "x", x)                                    # [2, 8, oh, ow]
    geo = ConvGeometry.of(ir.from_proto(model).graph.node(0), w.shape)
    patches = sampled_patches(x, geo, max_positions=10 ** 6, rng=rng)       # all positions, in order
    per = 8 // groups
    got = np.stack([patches[:, g] @ w[g * per:(g + 1) * per].reshape(per, -1).T for g in range(groups)], axis=1)
    got = got.reshape(2, ref.shape[2], ref.shape[3], 8).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    gram = grouped_gram(patches)                                            # float32 arithmetic, float64 out
    last = patches[:, groups - 1].astype(np.float64)
    assert gram.dtype == np.float64
    np.testing.assert_allclose(gram[groups - 1], last.T @ last, rtol=1e-5, atol=1e-4)


def test_conv_gptq_beats_round_to_nearest_per_group():
    from qcompile.passes.gptq import _conv_recon_error, gptq_conv
    rng = np.random.default_rng(1)
    for groups, w_shape in ((1, (16, 8, 3, 3)), (8, (8, 1, 3, 3))):
        k = w_shape[1] * 9
        h = np.stack([(lambda x: 2 * x.T @ x / x.shape[0])(correlated(k, rows=512, seed=g)) for g in range(groups)])
        w = rng.standard_normal(w_shape)
        got = gptq_conv(w, h, INT8_PC)
        rtn = gptq_conv(w, None, INT8_PC)
        deq = lambda p: p.q.astype(np.float64) * p.scale.reshape(-1, 1, 1, 1)  # noqa: E731
        assert got.q.shape == w_shape and got.scale.shape == (w_shape[0],) and got.axis == 0
        assert _conv_recon_error(w, deq(got), h) < 0.8 * _conv_recon_error(w, deq(rtn), h)
        np.testing.assert_array_equal(np.abs(got.q).max(axis=(1, 2, 3)) <= 127, True)


def test_gptq_on_a_cnn_ships_its_integers_and_lowers_the_output_error(tmp_path):
    from test_equalize_outputs import affine_cnn, cnn_data
    from test_schemes import compile_tiny, run
    model, data = affine_cnn(), cnn_data(24)
    weight = "weight: {dtype: int8, granularity: per_channel, symmetric: true}"
    tail = f"    - type: quantize\n      {weight}\n      activation: null\n"
    head = "apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n"
    gptq_recipe, rtn_recipe = tmp_path / "g.yaml", tmp_path / "r.yaml"
    gptq_recipe.write_text(head + f"    - type: gptq\n      ops: [Conv]\n      {weight}\n" + tail)
    rtn_recipe.write_text(head + tail)
    _, qdq, report = compile_tiny(tmp_path, model, str(gptq_recipe), data)
    _, rtn_qdq, _ = compile_tiny(tmp_path, model, str(rtn_recipe), data, name="rtn")
    per_layer = report["gptq"]["per_layer"]
    assert set(per_layer) == {"/c0/Conv", "/dw/Conv", "/pw2/Conv", "/pw/Conv"}
    # the kept rounding is never worse than plain rounding; where the Conv's inputs are correlated
    # (everything after the first Conv, which reads iid noise) GPTQ wins
    assert all(r["reconstruction_error"] <= r["rtn_reconstruction_error"] for r in per_layer.values())
    for conv in ("/dw/Conv", "/pw2/Conv"):
        assert per_layer[conv]["kept"] == "gptq" and \
            per_layer[conv]["gptq_reconstruction_error"] < per_layer[conv]["rtn_reconstruction_error"]
    (ref,) = run(model, {"x": data})
    (got,) = run(qdq, {"x": data}, optimize=False)
    (rtn,) = run(rtn_qdq, {"x": data}, optimize=False)
    assert np.sum((got - ref) ** 2) < np.sum((rtn - ref) ** 2)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    rtn_inits = {t.name: numpy_helper.to_array(t) for t in rtn_qdq.graph.initializer}
    assert not np.array_equal(inits["Wdw_quantized"], rtn_inits["Wdw_quantized"])   # GPTQ's, not rounded again


def test_gptq_skips_per_group_conv_weights_with_a_reason(pipeline):
    from test_equalize_outputs import affine_cnn, cnn_data
    recipe = ("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: gptq\n"
              "      ops: [Conv]\n      weight: {dtype: int4, granularity: per_group, group_size: 32, full_range: true}\n")
    _, ctx = pipeline(affine_cnn(), recipe, cnn_data(4))
    assert ctx.reports["gptq"]["layers"] == 0
    assert "per channel" in ctx.reports["gptq"]["skipped"]["/c0/Conv"]


def test_scale_search_lowers_the_reconstruction_error_and_only_shrinks_scales():
    """Each group's scale is the max|w| one or a shrunk fraction of it (never larger), chosen
    where the Hessian-weighted rounding error falls; the layer's output error drops."""
    x = correlated(128)
    h = 2 * x.T @ x / len(x)
    w = np.random.default_rng(4).standard_t(3, (128, 24)) * 0.05       # heavy tails: clipping pays
    scheme = WeightScheme(dtype="int4", granularity="per_group", group_size=32, full_range=True)
    plain = gptq_quantize(w, h, scheme, act_order=True)
    searched = gptq_quantize(w, h, scheme, act_order=True, scale_search=True)

    def err(p):
        deq = p.q.astype(np.float64) * np.repeat(p.scale, p.block, axis=0)[:128]
        return float(np.sum((x @ w - x @ deq) ** 2))

    assert err(searched) < 0.97 * err(plain)
    ratio = np.abs(searched.scale) / np.abs(plain.scale)
    assert np.all(ratio <= 1 + 1e-6) and np.all(ratio >= 0.7 - 1e-6) and np.any(ratio < 0.99)
