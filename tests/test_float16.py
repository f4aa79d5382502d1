"""float16 models, converted as users convert them (onnxconverter-common, keep_io_types true
and false), compile for every target family: the compiled model takes and returns what the
original did, verification runs the original float16 model in onnxruntime, and the accuracy
is that of the same compile of the float32 model (both are checked against their own
original, so the fp16 number is an independent measurement)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from models import bert_block, llama_block

float16 = pytest.importorskip("onnxconverter_common.float16")  # in the test extra: installed in CI

FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _half(files: dict, folder, keep_io: bool) -> dict:
    """The builder's model converted to float16, with its data in the model's input types."""
    folder.mkdir(parents=True, exist_ok=True)
    model = float16.convert_float_to_float16(onnx.load(str(files["model"])), keep_io_types=keep_io)
    onnx.save(model, str(folder / "model16.onnx"))
    out = {"model": folder / "model16.onnx"}
    for key in ("calib", "eval"):
        with np.load(files[key]) as z:
            arrays = {k: z[k].astype(np.float16) if z[k].dtype == np.float32 and not keep_io else z[k] for k in z.files}
        np.savez(folder / f"{key}.npz", **arrays)
        out[key] = folder / f"{key}.npz"
    return out


def _io_types(path) -> tuple[list[int], list[int]]:
    graph = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in graph.input], [v.type.tensor_type.elem_type for v in graph.output]


def _compile(run_cli, files, out, *extra) -> dict:
    res = run_cli([files["model"], "--calib", files["calib"], "--verify-data", files["eval"], "-o", out, "-q", *extra])
    assert res.code == 0, res.err
    return json.loads((out / "report.json").read_text())


def _sqnr(report: dict) -> float:
    return min(float(o["sqnr_db"]) for o in report["verification"]["outputs"].values())


@pytest.mark.parametrize("keep_io", [True, False])
@pytest.mark.parametrize("target", ["cpu", "ascend310b"])
def test_a_float16_cnn_compiles_like_its_float32_twin(run_cli, small_cnn_files, tmp_path, keep_io, target):
    half = _half(small_cnn_files, tmp_path / "half", keep_io)
    got = _compile(run_cli, half, tmp_path / "out16", "--target", target)
    ref = _compile(run_cli, small_cnn_files, tmp_path / "out32", "--target", target)
    assert _io_types(tmp_path / "out16" / "model.onnx") == _io_types(half["model"])
    assert got["half_precision"]["dtype"] == "float16" and got["half_precision"]["widened_initializers"] > 0
    assert [r["status"] for r in got["layers"].values()] == [r["status"] for r in ref["layers"].values()]
    assert abs(_sqnr(got) - _sqnr(ref)) < 1.0, (_sqnr(got), _sqnr(ref))


@pytest.mark.parametrize("recipe", ["w8a8-smooth", "w8a16", "w8a8-dynamic"])
def test_a_float16_transformer_keeps_float16_io(run_cli, tmp_path, recipe):
    files = bert_block.write(tmp_path / "fp32")
    half = _half(files, tmp_path / "half", keep_io=False)
    got = _compile(run_cli, half, tmp_path / "out16", "--recipe", recipe)
    ref = _compile(run_cli, files, tmp_path / "out32", "--recipe", recipe)
    inputs, outputs = _io_types(tmp_path / "out16" / "model.onnx")
    assert outputs == [HALF] and inputs == _io_types(half["model"])[0]      # int64 ids stay int64
    assert abs(_sqnr(got) - _sqnr(ref)) < 1.0, (_sqnr(got), _sqnr(ref))


def test_a_float16_decoder_gets_an_int8_cache_and_float16_logits(run_cli, tmp_path):
    files = llama_block.write(tmp_path / "fp32")
    half = _half(files, tmp_path / "half", keep_io=False)
    got = _compile(run_cli, half, tmp_path / "out16", "--recipe", "w8a8-kv8")
    graph = onnx.load(str(tmp_path / "out16" / "model.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert types["logits"] == HALF
    assert {t for n, t in types.items() if n.startswith(("past_key_values", "present"))} == {onnx.TensorProto.INT8}
    ref = _compile(run_cli, files, tmp_path / "out32", "--recipe", "w8a8-kv8")
    assert abs(_sqnr(got) - _sqnr(ref)) < 1.0, (_sqnr(got), _sqnr(ref))
