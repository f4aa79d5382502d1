"""report.json is rendered once, from the compile's typed results: the header, verification,
the layer table, warnings, each pass's section, timings, then the strategy's section — and
layer records render what they hold (scheme labels from the Scheme, float reasons, the
decision a later pass undid)."""

from __future__ import annotations

import json

from conftest import TinyModels
from qcompile.driver import compile_model
from qcompile.layers import LayerError, LayerRecord, LayerStatus, LayerTable, WeightBytes
from qcompile.report import render
from qcompile.schemes import ActivationScheme, Scheme, WeightScheme


def test_report_is_rendered_in_order_and_written_as_rendered(tmp_path):
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 8))
    result = compile_model(path, target="cpu:avx512_vnni", calib=npz, output_dir=tmp_path / "out", progress=False)
    report = result.report
    keys = list(report)
    assert keys[:6] == ["model", "target", "target_variant", "recipe", "opset", "input_shapes"]
    assert keys.index("verification") < keys.index("layers") < keys.index("warnings") < keys.index("canonicalize")
    assert keys.index("quantize") < keys.index("cpu_kernels") < keys.index("passes") < keys.index("compile_seconds")
    assert keys[-1] == "compile_seconds"
    assert report["layers"] == result.layers.to_json()
    assert [p["pass"] for p in report["passes"]] == ["canonicalize", "fuse", "calibrate", "quantize", "generate_kernels",
                                                   "cpu_lower"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    rendered = json.loads(json.dumps(render(result), default=str).replace("Infinity", '"inf"'))
    for key in ("layers", "verification", "quantize", "warnings", "input_shapes"):  # timings differ, rendered again
        assert on_disk[key] == rendered[key], key
    text = (tmp_path / "out" / "report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text   # non-finite numbers as strings: strict JSON


def test_quantized_record_labels_come_from_its_scheme():
    scheme = Scheme("recipe", WeightScheme("int8", "per_channel"), ActivationScheme("uint8", "per_tensor"))
    record = LayerRecord.quantized("/fc/MatMul", "MatMul", scheme, input_tensor="x", output_tensor="y",
                                   weight_bytes=WeightBytes(256, 72), notes=["a", "b"])
    record.lowering["kernel"] = "MatMulIntegerToFloat"
    record.error = LayerError("y", 31.5, 33.25)
    assert record.to_json() == {
        "op": "MatMul", "status": "quantized", "scheme": "W[int8 per_channel] A[uint8 per_tensor]",
        "weight": "int8 per_channel", "activation": "uint8 per_tensor", "input_tensor": "x", "output_tensor": "y",
        "weight_bytes": {"float": 256, "quantized": 72}, "note": "a; b", "kernel": "MatMulIntegerToFloat",
        "error": {"tensor": "y", "sqnr_db": 31.5, "added_sqnr_db": 33.25}}
    assert not record.weight_only and not record.float8
    mixed = Scheme("w4a16", WeightScheme("int4", "per_group", group_size=32), None)
    w4 = LayerRecord.quantized("/b/MatMul", "MatMul", mixed)
    assert w4.label == "w4a16: W[int4 g32] A[float]" and w4.activation_label == "float" and w4.weight_only


def test_a_layer_a_later_pass_undid_keeps_its_decision():
    table = LayerTable()
    scheme = Scheme("recipe", WeightScheme(), ActivationScheme("int8", "per_tensor"))
    table.set(LayerRecord.quantized("/a/MatMul", "MatMul", scheme))
    table.set(LayerRecord.float("/b/Conv", "Conv", "excluded by quantize.exclude"))
    table.fall_back("/a/MatMul", "ascend_lower: bias overflows int32")
    assert table.count(LayerStatus.QUANTIZED) == 0 and table.count(LayerStatus.FLOAT) == 2
    assert list(table.to_json()) == ["/a/MatMul", "/b/Conv"]   # first decided, first listed
    assert table.to_json()["/a/MatMul"] == {
        "op": "MatMul", "status": "float", "reason": "ascend_lower: bias overflows int32",
        "quantize_decision": {"weight": "int8 per_channel", "activation": "int8 per_tensor"}}
    assert table.to_json()["/b/Conv"] == {"op": "Conv", "status": "float", "reason": "excluded by quantize.exclude"}


def test_console_says_why_layers_stayed_float_and_warns_on_a_bad_worst_sample():
    import io

    from rich.console import Console

    from qcompile.report import float_reasons, print_summary
    layers = {
        "a": {"status": "float", "reason": "int8 is slower than float for layers under 1000000 MACs on avx2"},
        "b": {"status": "float", "reason": "int8 is slower than float for layers under 1000000 MACs on avx2"},
        "c": {"status": "float", "reason": "fallback: among the layers adding the most noise when quantized"},
        "d": {"status": "float", "reason": "excluded by quantize.exclude"},
        "e": {"status": "quantized", "scheme": "W8A8"},
    }
    assert float_reasons(layers) == {"under the speed threshold": 2, "fallback": 1, "excluded by the recipe": 1}
    out = io.StringIO()
    report = {"target": "cpu", "recipe": "w8a8", "layers": layers, "verification": {
        "samples": 4, "data": "x", "outputs": {"y": {"sqnr_db": 20.0, "cosine_mean": 0.99, "cosine_min": 0.43,
                                                     "max_abs": 1.0}}}}
    print_summary(report, Console(file=out, width=300))
    text = out.getvalue()
    assert "1 layers quantized, 4 float (2 under the speed threshold, 1 fallback, 1 excluded by the recipe)" in text
    assert "warning: output y: the worst sample's cosine is 0.43" in text
    report["verification"]["outputs"]["y"]["cosine_min"] = 0.95
    out = io.StringIO()
    print_summary(report, Console(file=out, width=300))
    assert "worst sample" not in out.getvalue()


def test_report_html_is_self_contained_and_shows_the_reports_numbers(tmp_path):
    import re
    path, npz = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m", TinyModels.data((16,), 8))
    result = compile_model(path, target="cpu:avx512_vnni", recipe="w8a8-dynamic", calib=npz,
                           output_dir=tmp_path / "out", progress=False)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)          # opens offline
    for name, output in result.report["verification"]["outputs"].items():
        assert f"<td>{name}</td><td class=n>{output['sqnr_db']}</td>" in page
    for name in result.report["layers"]:
        assert f"<td>{name}</td>" in page
    assert "<svg" in page   # the per-layer noise figure (matplotlib is a dependency)
