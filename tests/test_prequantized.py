"""Models that are already quantized (onnxruntime's QDQ, qcompile's own outputs) are lowered as
they are, their scales honoured, never quantized twice, and a lowering that cannot take a
form keeps that layer float *with the model's semantics* (a ReLU folded into a Q/DQ pair
survives the pair's removal)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qcompile.errors import EXIT_MODEL


@pytest.fixture(scope="module")
def ort_qdq(small_cnn_files, tmp_path_factory):
    """small_cnn through onnxruntime's quantize_static (QDQ, int8 per-channel weights, asymmetric int8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    with np.load(small_cnn_files["calib"]) as z:
        x = z["x"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x[i:i + 1]} for i in range(8)])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path_factory.mktemp("ortqdq") / "small_cnn.qdq.onnx"
    quantize_static(str(small_cnn_files["model"]), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def _run(run_cli, model, files, out, *extra) -> dict:
    res = run_cli([model, "--calib", files["calib"], "--verify-data", files["eval"], "-o", out, "-q", *extra])
    assert res.code == 0, res.err
    return json.loads((out / "report.json").read_text())


def _sqnr(report) -> float:
    return float(report["verification"]["outputs"]["logits"]["sqnr_db"])


def test_a_qdq_model_without_recipe_is_lowered_as_it_is_for_cpu(run_cli, small_cnn_files, ort_qdq, tmp_path):
    report = _run(run_cli, ort_qdq, small_cnn_files, tmp_path / "out")
    assert report["recipe"] == "prequantized" and "already quantized" in report["recipe_choice"]
    layers = report["layers"]
    assert len(layers) == 5 and all(r["status"] == "quantized" for r in layers.values())
    assert {r["scheme"] for r in layers.values()} == {"pre-quantized: W[int8 per_channel] A[int8 per_tensor]"}
    assert {r["kernel"] for r in layers.values()} <= {"QLinearConv", "QGemm", "QLinearMatMul"}
    assert _sqnr(report) == float("inf")                     # its own quantization, untouched
    assert "calibrate" not in {p["pass"] for p in report["passes"]}


def test_a_quantizing_recipe_on_a_quantized_model_is_refused_before_any_work(run_cli, small_cnn_files, ort_qdq,
                                                                              tmp_path):
    res = run_cli([ort_qdq, "--recipe", "w8a8", "--calib", small_cnn_files["calib"], "-o", tmp_path / "out", "-q"])
    assert res.code == EXIT_MODEL and "already quantized" in " ".join(res.err.split()), res.err
    assert not (tmp_path / "out").exists()


def test_prequantized_recipe_on_a_float_model_is_refused(run_cli, small_cnn_files, tmp_path):
    res = run_cli([small_cnn_files["model"], "--recipe", "prequantized", "-o", tmp_path / "out", "-q"])
    assert res.code == EXIT_MODEL and "has none" in " ".join(res.err.split()), res.err


def test_an_ascend_qdq_twin_fed_back_lowers_to_the_same_ascend_graph(run_cli, small_cnn_files, tmp_path):
    first = _run(run_cli, small_cnn_files["model"], small_cnn_files, tmp_path / "first", "--target", "ascend310b")
    again = _run(run_cli, tmp_path / "first" / "model.qdq.onnx", small_cnn_files, tmp_path / "again",
                 "--target", "ascend310b")
    assert again["recipe"] == "prequantized"
    assert again["ascend"]["ascend_ops"] == first["ascend"]["ascend_ops"] and again["ascend"]["layers_lowered"] == 5

    def nodes(path):
        graph = onnx.load(str(path)).graph
        return [(n.op_type, [a.name for a in n.attribute]) for n in graph.node]
    assert nodes(tmp_path / "again" / "model.onnx") == nodes(tmp_path / "first" / "model.onnx")
    # the scales were honoured: both deploy graphs compute the same thing on the float model's data
    res = run_cli(["verify", small_cnn_files["model"], tmp_path / "again" / "model.onnx", "--data",
                   small_cnn_files["eval"], "--json", tmp_path / "v.json"])
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "v.json").read_text())["outputs"] == first["verification"]["outputs"]


@pytest.mark.parametrize("source", ["ort_qdq", "qcompile_cpu"])
def test_forms_ascend_cannot_lower_stay_float_with_the_model_semantics(run_cli, small_cnn_files, ort_qdq, tmp_path,
                                                                       source):
    model = ort_qdq
    if source == "qcompile_cpu":   # uint8 activations with ReLUs folded into their Q/DQ pairs
        _run(run_cli, small_cnn_files["model"], small_cnn_files, tmp_path / "cpu", "--target", "cpu:avx2")
        model = tmp_path / "cpu" / "model.onnx"
    report = _run(run_cli, model, small_cnn_files, tmp_path / "out", "--target", "ascend310b")
    refused = [r for r in report["layers"].values() if r["status"] == "float" and r["reason"].startswith("ascend")]
    assert refused and all(("zero point" in r["reason"]) or ("UINT8" in r["reason"]) for r in refused)
    # float instead of int8, against the quantized original: the int8 noise, not a lost ReLU (that gave -4 dB)
    assert _sqnr(report) > 25, _sqnr(report)
