"""equalize_outputs: the float model is unchanged, every equalized Conv output has one range
across its channels, each reader kind takes the factor, readers that cannot are reported,
W8A8 error drops, verify's per-layer table still compares like with like, bad keys are
recipe errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TinyModels, ort_run_batched, to_proto

C = 8


def affine_cnn(seed: int = 0) -> onnx.ModelProto:
    """x → /c0/Conv (output channels 100× apart) → Mul(a0, ·) → Add b0 → HardSwish → Mul a1 →
    Add b1 (per channel) = x1; x1 → /dw/Conv (depthwise) → /pw2/Conv (reads it directly);
    x1 → /pw/Conv → Relu; y = the two branches added. PP-LCNet's block, shrunk."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((C, 3, 3, 3)) * 0.3 * np.geomspace(0.05, 5.0, C)[:, None, None, None]
    inits = {"W0": w0, "B0": rng.standard_normal(C) * 0.1, "a0": np.array([1.3]), "b0": np.array([0.2]),
             "a1": np.array([0.8]), "b1": rng.standard_normal((1, C, 1, 1)) * 0.1,
             "Wdw": rng.standard_normal((C, 1, 3, 3)) * 0.4 * np.geomspace(3.0, 0.1, C)[:, None, None, None],
             "Wpw": rng.standard_normal((C, C, 1, 1)) * 0.3, "Wpw2": rng.standard_normal((C, C, 1, 1)) * 0.3}
    n = helper.make_node
    nodes = [n("Conv", ["x", "W0", "B0"], ["y0"], name="/c0/Conv", pads=[1, 1, 1, 1]),
             n("Mul", ["a0", "y0"], ["m0"], name="/a0/Mul"),
             n("Add", ["m0", "b0"], ["t0"], name="/a0/Add"),
             n("HardSwish", ["t0"], ["h0"], name="/hs/HardSwish"),
             n("Mul", ["h0", "a1"], ["m1"], name="/a1/Mul"),
             n("Add", ["m1", "b1"], ["x1"], name="/a1/Add"),
             n("Conv", ["x1", "Wdw"], ["d"], name="/dw/Conv", pads=[1, 1, 1, 1], group=C),
             n("Conv", ["d", "Wpw2"], ["p2"], name="/pw2/Conv"),
             n("Conv", ["x1", "Wpw"], ["p"], name="/pw/Conv"),
             n("Relu", ["p"], ["r"], name="/pw/Relu"),
             n("Add", ["p2", "r"], ["y"], name="/out/Add")]
    graph = helper.make_graph(nodes, "affine_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cnn_data(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


def recipe(*steps: str) -> str:
    """canonicalize as w8a8-cnn runs it (the Conv affines' shifts stay in their Adds), then `steps`."""
    return ("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n      fold_affine_bias: false\n"
            + "".join(steps))


EQUALIZE = "    - type: equalize_outputs\n"
W8A8 = ("    - type: calibrate\n      method: minmax\n    - type: quantize\n      speed_fallback: false\n"
        "      weight: {dtype: int8, granularity: per_channel, symmetric: true}\n"
        "      activation: {dtype: auto, granularity: per_tensor, symmetric: auto}\n")


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    return out


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def test_float_outputs_unchanged_and_each_output_has_one_range(pipeline):
    model, data = affine_cnn(), cnn_data()
    ir_model, ctx = pipeline(model, recipe(EQUALIZE), data)
    got_model = to_proto(ir_model)
    ref = ort_run_batched(model, "x", data)
    got = ort_run_batched(got_model, "x", data)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    convs = ctx.reports["equalize_outputs"]["convs"]
    assert convs["/c0/Conv"]["reader"] == "mul /a0/Mul" and convs["/c0/Conv"]["range_ratio_before"] > 20
    assert convs["/dw/Conv"]["reader"] == "conv /pw2/Conv"
    assert convs["/pw/Conv"]["status"] == "skipped" and "Relu" in convs["/pw/Conv"]["reason"]
    for conv, tensor in (("/c0/Conv", "y0"), ("/dw/Conv", "d")):
        assert convs[conv]["range_ratio_after"] == pytest.approx(1.0, abs=1e-3)
        y = _outputs(with_outputs(got_model, [tensor]), data, tensor)
        amax = np.abs(y).max(axis=(0, 2, 3))
        assert amax.size == C and amax.max() / amax.min() == pytest.approx(1.0, rel=1e-4), (conv, amax)


def _outputs(model: onnx.ModelProto, data: np.ndarray, name: str) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([name], {"x": data[i:i + 1]})[0] for i in range(data.shape[0])])


def test_each_reader_takes_the_factor(pipeline):
    model = affine_cnn()
    w = TinyModels.weights(model)
    ir_model, _ = pipeline(model, recipe(EQUALIZE), cnn_data())
    g = {t.name: numpy_helper.to_array(t) for t in to_proto(ir_model).graph.initializer}
    s0 = w["B0"] / g["B0"]                                   # c0's rows and bias were divided by s0
    np.testing.assert_allclose(g["W0"], w["W0"] / s0[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(g["a0"].reshape(-1), w["a0"][0] * s0, rtol=1e-5)   # the Mul took it, per channel
    s_dw = w["Wdw"].reshape(C, -1)[:, 0] / g["Wdw"].reshape(C, -1)[:, 0]
    np.testing.assert_allclose(g["Wpw2"], w["Wpw2"] * s_dw[None, :, None, None], rtol=1e-5)
    assert not np.allclose(s0, 1.0) and not np.allclose(s_dw, 1.0)


def test_equalizing_lowers_the_w8a8_error(pipeline):
    model, data = affine_cnn(), cnn_data(32)
    ref = ort_run_batched(model, "x", data)
    plain, _ = pipeline(model, recipe(W8A8), data)
    equalized, ctx = pipeline(model, recipe(EQUALIZE, W8A8), data)
    before = sqnr(ref, ort_run_batched(to_proto(plain), "x", data))
    after = sqnr(ref, ort_run_batched(to_proto(equalized), "x", data))
    assert ctx.reports["equalize_outputs"]["equalized"] == 2
    assert after > before + 3.0, (before, after)


def test_verify_compares_equalized_tensors_like_with_like(tmp_path):
    """The compiled c0 output is the original divided by s per channel; verify multiplies it back."""
    from qcompile.driver import compile_model
    model, data = affine_cnn(), cnn_data(16)
    path, npz = TinyModels.save(model, tmp_path / "in", "model", data)
    rfile = tmp_path / "r.yaml"
    rfile.write_text(recipe(EQUALIZE, W8A8))
    result = compile_model(path, target="cpu", recipe=str(rfile), calib=npz, output_dir=tmp_path / "out",
                           progress=False, verify_samples=8)
    layers = result.report["verification"]["layers"]
    assert layers["/c0/Conv"]["sqnr_db"] > 25, layers["/c0/Conv"]    # without the undo: below 0 dB
    assert layers["/pw2/Conv"]["sqnr_db"] > 15, layers["/pw2/Conv"]


@pytest.mark.parametrize("option,key", [("strength: 0", "strength"), ("strength: 1.5", "strength"),
                                        ("readers: [relu]", "readers[0]")])
def test_bad_options_are_recipe_errors(tmp_path, run_cli, option, key):
    path, npz = TinyModels.save(affine_cnn(), tmp_path, "m", cnn_data(4))
    rfile = tmp_path / "r.yaml"
    rfile.write_text(recipe(f"    - type: equalize_outputs\n      {option}\n"))
    out = tmp_path / "out"
    res = run_cli([path, "--recipe", rfile, "--calib", npz, "-o", out])
    assert res.code == 4 and f"key '{key}'" in res.err and not out.exists(), res.err


def test_without_calibration_data_it_says_so(tmp_path, run_cli):
    path, _ = TinyModels.save(affine_cnn(), tmp_path, "m")
    rfile = tmp_path / "r.yaml"
    rfile.write_text(recipe(EQUALIZE))
    out = tmp_path / "out"
    res = run_cli([path, "--recipe", rfile, "-o", out])
    assert res.code == 5 and "equalize_outputs needs calibration data" in res.err and not out.exists(), res.err


def test_dead_channels_are_left_alone(pipeline):
    """A channel a thousand times narrower than the widest keeps s = 1 (scaling it up would only
    inflate its bias); the others still end on one range."""
    model = affine_cnn()
    w0 = next(t for t in model.graph.initializer if t.name == "W0")
    arr = numpy_helper.to_array(w0).copy()
    arr[2] *= 1e-6
    w0.CopyFrom(numpy_helper.from_array(arr, "W0"))
    b0 = next(t for t in model.graph.initializer if t.name == "B0")
    bias = numpy_helper.to_array(b0).copy()
    bias[2] = 0.0
    b0.CopyFrom(numpy_helper.from_array(bias, "B0"))
    ir_model, ctx = pipeline(model, recipe(EQUALIZE), cnn_data())
    rec = ctx.reports["equalize_outputs"]["convs"]["/c0/Conv"]
    assert rec["dead_channels"] == 1 and rec["range_ratio_after"] == pytest.approx(1.0, abs=1e-3)
    g = {t.name: numpy_helper.to_array(t) for t in to_proto(ir_model).graph.initializer}
    np.testing.assert_array_equal(g["W0"][2], arr[2])
    assert not np.allclose(g["W0"][0], arr[0])

