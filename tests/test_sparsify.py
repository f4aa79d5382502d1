"""sparsify (the sparse half of W8A8SC): SparseGPT's blocked implementation against a plain
column-by-column reference written here, 2:4 masks checked exactly (along the input channels,
for linears and Conv taps), SparseGPT beating magnitude pruning on correlated inputs, the
recipe's contract, and ATC's --sparsity=1 per SoC."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import TinyModels, ort_run, ort_run_batched, to_proto
from qcompile.passes.sparsify import magnitude_mask, nm_mask, sparsegpt


def correlated(k: int, rows: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    return rng.standard_normal((rows, k)) @ mix * rng.uniform(0.2, 3.0, k)


def reference_sparsegpt_24(w, h, damp=0.01):
    """Column by column, every later column updated at once (no lazy batches): at each group of
    4 input channels, keep the 2 with the largest w²/[U]²_kk of the weights as updated so far,
    zero the others, spread each column's error e = (w - kept)/U_kk along row k of U, the upper
    Cholesky factor of H⁻¹ (SparseGPT's Algorithm 1 with the 2:4 mask)."""
    w = w.astype(np.float64).copy()
    k = w.shape[0]
    h = h.copy()
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    keep = None
    for j in range(k):
        if j % 4 == 0:
            score = w[j:j + 4] ** 2 / np.diag(u)[j:j + 4, None] ** 2
            keep = np.zeros_like(score, dtype=bool)
            for col in range(w.shape[1]):
                top = sorted(range(4), key=lambda r: (-score[r, col], r))[:2]
                keep[top, col] = True
        kept = np.where(keep[j % 4], w[j], 0.0)
        e = (w[j] - kept) / u[j, j]
        w[j] = kept
        w[j + 1:] -= np.outer(u[j, j + 1:], e)
    return w


@pytest.mark.parametrize("block", [8, 16, 48])
def test_blocked_sparsegpt_equals_the_column_by_column_reference(block):
    x = correlated(48)
    h = 2 * x.T @ x / len(x)
    w = np.random.default_rng(1).standard_normal((48, 10)) * 0.1
    got = sparsegpt(w, h, "2:4", 0.5, block_size=block)
    want = reference_sparsegpt_24(w, h)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_24_masks_keep_exactly_two_of_every_four_input_channels():
    rng = np.random.default_rng(0)
    score = rng.standard_normal((16, 5)) ** 2
    mask = nm_mask(score)
    groups = mask.reshape(4, 4, 5)
    assert (groups.sum(axis=1) == 2).all()
    for g in range(4):      # the kept ones are the two largest scores of their group, per column
        for c in range(5):
            top = set(np.argsort(-score[4 * g:4 * g + 4, c], kind="stable")[:2])
            assert set(np.flatnonzero(groups[g, :, c])) == top
    w = rng.standard_normal((16, 5))
    assert (magnitude_mask(w, "2:4", 0.5) == nm_mask(np.abs(w))).all()
    m = magnitude_mask(w, "unstructured", 0.3)
    assert m.sum() == w.size - round(0.3 * w.size)
    assert np.abs(w)[~m].max() <= np.abs(w)[m].min()


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_beats_magnitude_pruning_on_correlated_inputs(pattern):
    x = correlated(64)
    h = 2 * x.T @ x / len(x)
    w = np.random.default_rng(3).standard_normal((64, 24)) * 0.1
    sgpt = sparsegpt(w, h, pattern, 0.5, block_size=16)
    mag = w * magnitude_mask(w, pattern, 0.5)

    def err(v):
        return float(np.sum((x @ w - x @ v) ** 2))

    assert np.mean(sgpt == 0) == pytest.approx(0.5)
    assert err(sgpt) < 0.8 * err(mag)


SPARSE_RECIPE = """
apiversion: qcompile/v1
metadata: {{name: sc, description: test}}
spec:
  passes:
    - type: canonicalize
    - type: sparsify
      method: {method}
      pattern: "{pattern}"
      sparsity: 0.5
      output_layers: {output_layers}
    - type: calibrate
    - type: quantize
      speed_fallback: false
"""


def _sparse_run(pipeline, method, pattern="2:4", output_layers="prune"):
    model = TinyModels(0).mlp(64, 32, 8)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((96, 64)) @ (np.eye(64) + rng.standard_normal((64, 64)) * 0.3)).astype(np.float32)
    ir_model, ctx = pipeline(model, SPARSE_RECIPE.format(method=method, pattern=pattern, output_layers=output_layers), x)
    return model, x, to_proto(ir_model), ctx


def test_the_layer_feeding_the_output_stays_dense_by_default(pipeline):
    """Found on SmolLM2: pruning the tied lm_head 2:4 costs the most; read off the graph, not names."""
    _, _, model, ctx = _sparse_run(pipeline, "sparsegpt", output_layers="dense")
    report = ctx.reports["sparsify"]
    assert report["layers"] == 1 and list(report["per_layer"]) == ["/fc1/MatMul"]
    assert report["dense"] == {"/fc2/MatMul": "feeds a model output (output_layers: dense)"}
    w2 = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W2_quantized")
    assert np.mean(w2 == 0) < 0.1


def test_w8a8sc_graph_holds_24_sparse_int8_weights_and_beats_magnitude(pipeline):
    model, x, sgpt, ctx = _sparse_run(pipeline, "sparsegpt")
    _, _, mag, _ = _sparse_run(pipeline, "magnitude")
    q = {t.name: numpy_helper.to_array(t) for t in sgpt.graph.initializer if t.data_type == 3}   # int8
    assert set(q) >= {"W1_quantized", "W2_quantized"}
    for name in ("W1_quantized", "W2_quantized"):
        groups = (q[name] != 0).reshape(-1, 4, q[name].shape[1])          # [K/4, 4, N] along K
        assert (groups.sum(axis=1) <= 2).all()
    report = ctx.reports["sparsify"]
    assert report["layers"] == 2 and report["sparsity"] == pytest.approx(0.5)
    assert report["int8_bytes"]["sparse"] == report["int8_bytes"]["dense"] * 3 // 4
    assert len(ctx.sparse) == 2 and ctx.sparse.patterns() == {"2:4"}
    ref = ort_run(model, {"x": x})[0]
    got = ort_run_batched(sgpt, "x", x)
    got_mag = ort_run_batched(mag, "x", x)
    assert np.sum((got - ref) ** 2) < np.sum((got_mag - ref) ** 2)


def test_conv_24_pruning_groups_input_channels_at_each_tap(pipeline):
    model = TinyModels(0).conv_bn_relu(cin=8, cout=4, hw=8)
    x = TinyModels.data((8, 8, 8), 16)
    recipe = SPARSE_RECIPE.format(method="sparsegpt", pattern="2:4", output_layers="prune").split("    - type: calibrate")[0]
    ir_model, _ = pipeline(model, recipe, x)
    w = next(numpy_helper.to_array(t) for t in to_proto(ir_model).graph.initializer if t.dims[:2] == [4, 8])
    nonzero = (w != 0).reshape(4, 2, 4, 3, 3)                      # [Cout, Cin/4, 4, kh, kw]
    assert (nonzero.sum(axis=2) == 2).all()


def test_24_on_a_layer_without_four_input_channels_names_it(run_cli, tmp_path):
    model = TinyModels(0).mlp(18, 32, 8)
    path, npz = TinyModels.save(model, tmp_path, "m", TinyModels.data((18,), 64))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SPARSE_RECIPE.format(method="magnitude", pattern="2:4", output_layers="prune"))
    res = run_cli([path, "--recipe", recipe, "--calib", npz, "-o", tmp_path / "out"])
    assert res.code == 4 and "'/fc1/MatMul'" in res.err and "18 input channels" in res.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,key", [("sparsity: 1.0", "sparsity"), ("sparsity: 0.0", "sparsity"),
                                      ("sparsity: 0.7", "sparsity")])
def test_sparsity_outside_the_pattern_is_a_recipe_error(run_cli, tmp_path, text, key):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SPARSE_RECIPE.format(method="magnitude", pattern="2:4", output_layers="prune").replace("sparsity: 0.5", text))
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    res = run_cli([path, "--recipe", recipe, "--calib", npz, "-o", tmp_path / "out"])
    assert res.code == 4 and f"key '{key}'" in res.err


def test_gptq_after_sparsify_is_an_order_error(run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SPARSE_RECIPE.format(method="magnitude", pattern="2:4", output_layers="prune").replace(
        "    - type: calibrate\n", "    - type: gptq\n      weight: {dtype: int8, granularity: per_channel}\n"
                                  "    - type: calibrate\n"))
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    res = run_cli([path, "--recipe", recipe, "--calib", npz, "-o", tmp_path / "out"])
    assert res.code == 4 and "'gptq'" in res.err and "sparse" in res.err and "sparsify" in res.err


@pytest.mark.parametrize("target,flag", [("ascend310b", True), ("ascend910b", True), ("ascend310p", None)])
def test_atc_sparsity_flag_per_soc(run_cli, tmp_path, target, flag):
    """310B and 910B compress 2:4 (atc --sparsity=1); 310P has no --sparsity: refused before any work."""
    model = TinyModels(0).mlp(64, 32, 8)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((96, 64))).astype(np.float32)
    path, npz = TinyModels.save(model, tmp_path, "m", x)
    out = tmp_path / "out"
    res = run_cli([path, "--target", target, "--recipe", "w8a8sc", "--calib", npz, "--input-shape", "x:1,64",
                   "-o", out])
    if flag is None:
        assert res.code == 6 and "2:4" in res.err and "310P" in res.err
        assert not out.exists()
        return
    assert res.code == 0, res.err
    script = (out / "atc.sh").read_text()
    assert "--sparsity=1" in script.splitlines()[-1]
