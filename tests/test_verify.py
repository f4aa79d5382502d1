"""verify: the error metrics (ErrorStats) against numpy formulas, the output table against an
independent numpy computation on the same samples, the per-layer table (a layer's added noise,
rescaled tensors multiplied back) and the integer I/O codecs of an int8 KV cache."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.analyses import Rescales
from qcompile.calib_data import InputSpec, open_dataset
from qcompile.verify import ErrorStats, verify_models


def test_sqnr_is_over_all_samples_and_batches():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((6, 50))
    approx = ref + rng.standard_normal((6, 50)) * 0.01
    stats = ErrorStats()
    stats.update(ref[:4], approx[:4])
    stats.update(ref[4:], approx[4:])  # streamed in two batches: the same as one
    expected = 10 * math.log10(float(np.sum(ref ** 2)) / float(np.sum((ref - approx) ** 2)))
    assert stats.sqnr_db == pytest.approx(expected, rel=1e-12)
    assert stats.max_abs == pytest.approx(float(np.abs(ref - approx).max()))
    x = np.array([[1.0, -1.0, 1.0, -1.0]])
    for got, db in ((np.zeros((1, 4)), 0.0), (x * 0.9, 20.0)):  # equal noise and signal: 0 dB; 0.1x: 20 dB
        s = ErrorStats()
        s.update(x, got)
        assert s.sqnr_db == pytest.approx(db, abs=1e-9)
    same = ErrorStats()
    same.update(x, x)
    assert same.sqnr_db == math.inf
    silent = ErrorStats()
    silent.update(np.zeros((1, 5)), np.ones((1, 5)))
    assert silent.sqnr_db == -math.inf


def test_cosine_is_per_sample_then_mean_and_min():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 300)), rng.standard_normal((3, 300))
    b[0] = 3 * a[0]                                  # sample 0: cosine 1
    stats = ErrorStats()
    stats.update(a, b)
    per = [float(a[i] @ b[i]) / math.sqrt(float(a[i] @ a[i]) * float(b[i] @ b[i])) for i in range(3)]
    assert stats.cosine_mean == pytest.approx(np.mean(per), rel=1e-12)
    assert stats.cosine_min == pytest.approx(min(per), rel=1e-12)
    zeros = ErrorStats()
    zeros.update(np.zeros((2, 3)), np.stack([np.zeros(3), np.ones(3)]))
    assert zeros.cosines == [1.0, 0.0]                # both zero: equal; one zero: orthogonal


def test_non_finite_values_are_left_out_of_sqnr():
    ref = np.array([[1.0, np.inf, 2.0]])
    stats = ErrorStats()
    stats.update(ref, np.array([[1.0, 5.0, 1.0]]))
    assert stats.sqnr_db == pytest.approx(10 * math.log10(5.0 / 1.0))


def _two_layers(path, w1, w2, *, scale_mid=None):
    """x -> MatMul(w1) -> h [-> Mul(scale_mid) (a rescaled h)] -> MatMul(w2) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/fc1/MatMul")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    mid = "h"
    if scale_mid is not None:
        nodes.append(helper.make_node("Mul", ["h", "m"], ["h2"], name="/mid/Mul"))
        inits.append(numpy_helper.from_array(scale_mid, "m"))
        mid = "h2"
    nodes.append(helper.make_node("MatMul", [mid, "w2"], ["y"], name="/fc2/MatMul"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _data(tmp_path, x):
    np.savez(tmp_path / "d.npz", x=x)
    return open_dataset(tmp_path / "d.npz", [InputSpec("x", np.dtype(np.float32), (None, 8))])


def test_outputs_and_layer_table_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    w2_noisy = (w2 + rng.standard_normal(w2.shape) * 0.05).astype(np.float32)  # only layer 2 adds error
    x = rng.standard_normal((10, 8)).astype(np.float32)
    ref = _two_layers(tmp_path / "ref.onnx", w1, w2)
    got = _two_layers(tmp_path / "got.onnx", w1, w2_noisy)
    layers = {"/fc1/MatMul": {"input": "x", "output": "h"}, "/fc2/MatMul": {"input": "h", "output": "y"}}
    res = verify_models(ref, got, _data(tmp_path, x), samples=10, layers=layers, layer_samples=10, progress=False)
    y, y_noisy = x @ w1 @ w2, x @ w1 @ w2_noisy
    sqnr = 10 * math.log10(float(np.sum(y.astype(np.float64) ** 2)) / float(np.sum((y - y_noisy) ** 2)))
    assert res["samples"] == 10
    assert res["outputs"]["y"]["sqnr_db"] == pytest.approx(sqnr, abs=2e-3)
    assert res["layers"]["/fc1/MatMul"]["sqnr_db"] == math.inf             # layer 1 is exact
    assert res["layers"]["/fc1/MatMul"]["added_sqnr_db"] == math.inf
    assert res["layers"]["/fc2/MatMul"]["added_sqnr_db"] == pytest.approx(sqnr, abs=2e-3)


def test_rescaled_tensors_are_multiplied_back_before_comparing(tmp_path):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    s = rng.uniform(0.5, 4.0, 8).astype(np.float32)
    ref = _two_layers(tmp_path / "ref.onnx", w1, w2)
    # the "compiled" graph divides h's channels by s (w1 / s) and multiplies them back before fc2
    got = _two_layers(tmp_path / "got.onnx", (w1 / s).astype(np.float32), w2, scale_mid=s)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    layers = {"/fc1/MatMul": {"input": "x", "output": "h"}}
    plain = verify_models(ref, got, _data(tmp_path, x), samples=6, layers=layers, progress=False)
    rescales = Rescales()
    rescales.note("h", -1, s)
    undone = verify_models(ref, got, _data(tmp_path, x), samples=6, layers=layers, rescales=rescales, progress=False)
    assert plain["layers"]["/fc1/MatMul"]["sqnr_db"] < 10
    assert undone["layers"]["/fc1/MatMul"]["sqnr_db"] > 100


def test_int8_io_is_encoded_and_decoded_with_the_metadata_scales(tmp_path):
    """A graph whose input and output are int8 (as kv_cache makes past/present): verify feeds it
    the float data encoded with the metadata scale and decodes its output before comparing."""
    scale = 0.05
    ref_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])])
    ref = helper.make_model(ref_graph, opset_imports=[helper.make_opsetid("", 17)])
    ref.ir_version = 8
    onnx.save(ref, tmp_path / "ref.onnx")
    q_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                [helper.make_tensor_value_info("x", TensorProto.INT8, [None, 8])],
                                [helper.make_tensor_value_info("y", TensorProto.INT8, [None, 8])])
    q = helper.make_model(q_graph, opset_imports=[helper.make_opsetid("", 17)])
    q.ir_version = 8
    codec = {"dtype": "int8", "scale": [scale], "shape": []}
    helper.set_model_props(q, {"qcompile.io_quantization": json.dumps({"x": codec, "y": codec})})
    onnx.save(q, tmp_path / "q.onnx")
    x = np.random.default_rng(3).uniform(-4, 4, (5, 8)).astype(np.float32)
    res = verify_models(tmp_path / "ref.onnx", tmp_path / "q.onnx", _data(tmp_path, x), samples=5, progress=False)
    decoded = np.clip(np.rint(x / scale), -128, 127) * scale                # independent: int8 round trip
    want = 10 * math.log10(float(np.sum(x.astype(np.float64) ** 2)) / float(np.sum((x - decoded) ** 2)))
    assert res["outputs"]["y"]["sqnr_db"] == pytest.approx(want, abs=2e-3)
    assert res["outputs"]["y"]["max_abs"] <= scale / 2 + 1e-6
