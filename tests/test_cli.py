"""End to end through `qcompile.cli.main` on the small CNN."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from models import small_cnn
import yaml

from conftest import ort_run_batched, ort_session
from qcompile.cli import main
from qcompile.targets import load_target

OUTPUT_FILES = {"model.onnx", "report.json", "report.html", "recipe.resolved.yaml"}


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def compiled(small_cnn_files, tmp_path_factory):
    """Two identical w8a8 compiles of the small CNN (for determinism), plus their exit codes."""
    root = tmp_path_factory.mktemp("cli")
    outs, codes = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))  # a crash log must not land in the repository
        for i in range(2):
            out = root / f"out{i}"
            codes.append(main([str(small_cnn_files["model"]), "--target", "cpu", "--recipe", "w8a8",
                               "--calib", str(small_cnn_files["calib"]), "--verify-data",
                               str(small_cnn_files["eval"]), "-o", str(out), "-q"]))
            outs.append(out)
    return {"codes": codes, "out": outs[0], "out2": outs[1], "root": root}


def test_compile_exit_0_and_output_files(compiled):
    assert compiled["codes"] == [0, 0]
    out = compiled["out"]
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert not [p for p in compiled["root"].iterdir() if ".tmp-" in p.name]  # staging cleaned up


def test_report_has_verification_and_layers(compiled, small_cnn_files):
    report = json.loads((compiled["out"] / "report.json").read_text())
    assert report["target"] == "cpu" and report["recipe"] == "w8a8"
    ver = report["verification"]
    assert ver["samples"] == 64
    logits = ver["outputs"]["logits"]
    assert isinstance(logits["sqnr_db"], float) and math.isfinite(logits["sqnr_db"]) and logits["sqnr_db"] > 25
    assert 0.99 < logits["cosine_min"] <= logits["cosine_mean"] <= 1.0 + 1e-9
    # every Conv/Gemm of the model has a per-layer entry; quantized ones carry their error
    graph = onnx.load(small_cnn_files["model"]).graph
    n_layers = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in graph.node)
    layers = report["layers"]
    assert len(layers) == n_layers
    quantized = {k: v for k, v in layers.items() if v["status"] == "quantized"}
    assert quantized, layers
    for name, rec in layers.items():
        if rec["status"] == "float":
            assert rec["reason"]
        else:
            assert rec["weight"].startswith("int8") and "error" in rec
            assert rec["error"]["sqnr_db"] == ver["layers"][name]["sqnr_db"]
    assert set(ver["layers"]) == set(quantized)


def test_report_sqnr_matches_an_independent_computation(compiled, small_cnn_files):
    """Re-run both models in onnxruntime on the same eval samples; SQNR in numpy. The
    compiled model runs as deployed (onnxruntime's int8 kernels fused)."""
    report = json.loads((compiled["out"] / "report.json").read_text())
    x = np.load(small_cnn_files["eval"])["x"]
    ref = ort_run_batched(small_cnn_files["model"], "x", x)
    got = ort_run_batched(compiled["out"] / "model.onnx", "x", x, optimize=True)
    assert report["verification"]["outputs"]["logits"]["sqnr_db"] == pytest.approx(sqnr(ref, got), abs=2e-3)
    assert report["verification"]["outputs"]["logits"]["max_abs"] == pytest.approx(
        float(np.max(np.abs(ref - got))), abs=2e-6)


def test_cpu_lower_reports_int8_kernels(compiled):
    report = json.loads((compiled["out"] / "report.json").read_text())
    kernels = report["cpu_kernels"]
    assert kernels["int8_layers"] >= 1
    assert kernels["optimized_op_counts"].get("QLinearConv", 0) >= 1
    fired = [r["kernel"] for r in report["layers"].values() if r["status"] == "quantized"]
    assert "QLinearConv" in fired
    int8_ops = set(load_target("cpu").setting("int8_kernels"))
    assert kernels["int8_layers"] == sum(k in int8_ops for k in fired)
    assert [p["pass"] for p in report["passes"]] == ["canonicalize", "fuse", "calibrate", "quantize", "generate_kernels",
                                                   "cpu_lower"]
    assert report["fuse"]["nothing_to_fuse"]          # a CNN: fuse leaves it (and its opset) alone


def test_compiled_model_runs_in_onnxruntime(compiled, small_cnn_files):
    path = compiled["out"] / "model.onnx"
    onnx.checker.check_model(onnx.load(path))
    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["x"] and [o.name for o in sess.get_outputs()] == ["logits"]
    x = np.load(small_cnn_files["eval"])["x"][:1]
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (1, 10) and np.all(np.isfinite(y))
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_two_identical_runs_are_byte_identical(compiled):
    a, b = compiled["out"], compiled["out2"]
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / "recipe.resolved.yaml").read_bytes() == (b / "recipe.resolved.yaml").read_bytes()


def test_runs_in_separate_processes_are_byte_identical(small_cnn_files, tmp_path):
    """Different hash seeds (set/dict iteration orders) must not change the artifact."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-m", "qcompile", str(small_cnn_files["model"]), "--calib",
                               str(small_cnn_files["calib"]), "--no-verify", "-q", "-o", str(out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    for name in ("model.onnx", "recipe.resolved.yaml"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_resolved_recipe_records_provenance(compiled, small_cnn_files):
    resolved = yaml.safe_load((compiled["out"] / "recipe.resolved.yaml").read_text())
    assert [p["type"] for p in resolved["spec"]["passes"]] == ["canonicalize", "fuse", "calibrate", "quantize"]
    assert [p["type"] for p in resolved["target"]["lowering"]] == ["generate_kernels", "cpu_lower"]
    quant = resolved["spec"]["passes"][3]
    assert quant["weight"]["dtype"] == "int8" and "exclude" in quant  # defaults filled in
    prov = resolved["provenance"]
    assert prov["model_sha256"] == sha256(small_cnn_files["model"])
    assert prov["calibration_sha256"] == sha256(small_cnn_files["calib"])
    assert prov["input_shapes"] == {"x": [1, 3, small_cnn.SIZE, small_cnn.SIZE]}
    assert resolved["target"]["name"] == "cpu"


def test_dump_after_quantize(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    res = run_cli([small_cnn_files["model"], "--calib", small_cnn_files["calib"], "--no-verify",
                   "--dump-after", "quantize", "-o", out, "-q"])
    assert res.code == 0, res.err
    dumps = list((out / "dumps").glob("*quantize.onnx"))
    assert len(dumps) == 1
    dumped = onnx.load(dumps[0])
    assert "QuantizeLinear" in {n.op_type for n in dumped.graph.node}
    assert "report.json" in {p.name for p in out.iterdir()}
    assert not list((out / "dumps").glob("*calibrate.onnx"))  # only the pass asked for


@pytest.mark.parametrize("sub,expect", [("targets", "cpu"), ("recipes", "w8a8"), ("passes", "quantize")])
def test_listing_subcommands(run_cli, sub, expect):
    res = run_cli([sub])
    assert res.code == 0
    assert expect in res.out


def test_help_lists_exit_codes(run_cli):
    res = run_cli(["--help"])
    assert res.code == 0
    assert "exit codes" in res.out and "7" in res.out


def test_verify_subcommand(run_cli, compiled, small_cnn_files, tmp_path):
    js = tmp_path / "verify.json"
    res = run_cli(["verify", small_cnn_files["model"], compiled["out"] / "model.onnx",
                   "--data", small_cnn_files["eval"], "--json", js])
    assert res.code == 0, res.err
    assert "logits" in res.out
    data = json.loads(js.read_text())
    report = json.loads((compiled["out"] / "report.json").read_text())
    # same data, same models, same 64 samples: the same numbers as the compile's verification
    assert data["outputs"]["logits"]["sqnr_db"] == report["verification"]["outputs"]["logits"]["sqnr_db"]


def test_verify_subcommand_identical_models(run_cli, small_cnn_files, tmp_path):
    js = tmp_path / "same.json"
    res = run_cli(["verify", small_cnn_files["model"], small_cnn_files["model"], "--data",
                   small_cnn_files["eval"], "--samples", "4", "--json", js])
    assert res.code == 0, res.err
    out = json.loads(js.read_text())["outputs"]["logits"]
    assert out["sqnr_db"] == "inf" and out["max_abs"] == 0.0


def test_python_api(small_cnn_files, tmp_path):
    import qcompile
    result = qcompile.compile_model(small_cnn_files["model"], target="cpu", recipe="w8a8",
                                    calib=small_cnn_files["calib"], output_dir=tmp_path / "api",
                                    verify=False, progress=False)
    assert {p.name for p in result.files} == OUTPUT_FILES
    assert "verification" not in result.report


def test_w8a16_without_calib(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "w8a16"
    res = run_cli([small_cnn_files["model"], "--recipe", "w8a16", "-o", out, "-q"])
    assert res.code == 0, res.err
    model = onnx.load(out / "model.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" in ops
    report = json.loads((out / "report.json").read_text())
    assert "calibrate" not in [p["pass"] for p in report["passes"]]
    assert all(r["activation"] == "float" for r in report["layers"].values() if r["status"] == "quantized")


def test_input_shape_with_batch_2(run_cli, small_cnn_files, tmp_path):
    """A pinned batch of 2: calibration and verification must feed batches of 2."""
    out = tmp_path / "b2"
    res = run_cli([small_cnn_files["model"], "--calib", small_cnn_files["calib"], "--verify-data",
                   small_cnn_files["eval"], "--input-shape", f"x:2,3,{small_cnn.SIZE},{small_cnn.SIZE}", "-o", out, "-q"])
    assert res.code == 0, res.err
    assert ort_session(out / "model.onnx").get_inputs()[0].shape == [2, 3, small_cnn.SIZE, small_cnn.SIZE]
    report = json.loads((out / "report.json").read_text())
    assert report["calibrate"]["samples"] == 32 and report["verification"]["samples"] == 64


@pytest.fixture(scope="module")
def batch3(small_cnn_files, tmp_path_factory):
    """Pinned batch 3: neither 32 calibration nor 64 eval samples divide into it."""
    out = tmp_path_factory.mktemp("b3") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        code = main([str(small_cnn_files["model"]), "--calib", str(small_cnn_files["calib"]), "--verify-data",
                     str(small_cnn_files["eval"]), "--input-shape", f"x:3,3,{small_cnn.SIZE},{small_cnn.SIZE}", "-o", str(out), "-q"])
    return code, out


def test_fixed_batch_that_does_not_divide_the_samples(batch3):
    code, out = batch3
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibrate"]["samples"] == 30  # 10 full batches of 3; the last 2 samples dropped


def test_fixed_batch_verification_numbers(batch3, small_cnn_files):
    """The verification SQNR is the one over the 63 samples that fill 21 batches of 3."""
    code, out = batch3
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    x = np.load(small_cnn_files["eval"])["x"][:63]
    ref = ort_run_batched(small_cnn_files["model"], "x", x)
    sess = ort_session(out / "model.onnx", optimize=True)
    got = np.concatenate([sess.run(None, {"x": x[i:i + 3]})[0] for i in range(0, 63, 3)])
    assert report["verification"]["outputs"]["logits"]["sqnr_db"] == pytest.approx(sqnr(ref, got), abs=2e-3)


def test_fixed_batch_verification_reports_the_samples_it_used(batch3):
    code, out = batch3
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["samples"] == 63


def test_external_data_output(run_cli, compiled, small_cnn_files, tmp_path):
    out = tmp_path / "ext"
    res = run_cli([small_cnn_files["model"], "--calib", small_cnn_files["calib"], "--verify-data",
                   small_cnn_files["eval"], "--external-data", "-o", out, "-q"])
    assert res.code == 0, res.err
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES | {"model.onnx.data"}
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "model.onnx.data" for t in external)
    # the same model as the inline compile: identical outputs
    x = np.load(small_cnn_files["eval"])["x"][:8]
    np.testing.assert_array_equal(ort_run_batched(out / "model.onnx", "x", x),
                                  ort_run_batched(compiled["out"] / "model.onnx", "x", x))


def test_model_with_external_data_compiles(run_cli, compiled, small_cnn_files, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.load(small_cnn_files["model"]), src / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    out = tmp_path / "out"
    res = run_cli([src / "m.onnx", "--calib", small_cnn_files["calib"], "--verify-data", small_cnn_files["eval"],
                   "-o", out, "-q"])
    assert res.code == 0, res.err
    shutil.rmtree(src)  # the compiled model must not refer back to the input's files
    x = np.load(small_cnn_files["eval"])["x"][:8]
    np.testing.assert_array_equal(ort_run_batched(out / "model.onnx", "x", x),
                                  ort_run_batched(compiled["out"] / "model.onnx", "x", x))


def test_model_listing_weights_among_its_inputs(run_cli, small_cnn_files, tmp_path):
    model = onnx.load(small_cnn_files["model"])
    for init in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    path = tmp_path / "weights_as_inputs.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    res = run_cli([path, "--calib", small_cnn_files["calib"], "--verify-data", small_cnn_files["eval"],
                   "-o", out, "-q"])
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["outputs"]["logits"]["sqnr_db"] > 25


def test_summary_lists_only_layers_that_add_error():
    from rich.console import Console

    from qcompile.report import print_summary
    console = Console(record=True, width=200)
    ver = {"samples": 2, "data": "d", "outputs": {"y": {"sqnr_db": 30.0, "cosine_mean": 0.99, "cosine_min": 0.98,
                                                         "max_abs": 0.1}},
           "layers": {"a": {"added_sqnr_db": 25.0}, "b": {"added_sqnr_db": float("inf")},
                      "c": {"added_sqnr_db": 12.5}}}
    print_summary({"target": "cpu", "recipe": "r", "layers": {}, "verification": ver}, console)
    text = console.export_text()
    assert "layers adding the most error: c (12.5 dB), a (25.0 dB)" in text and "inf" not in text


def test_set_overrides_one_recipe_key_and_lands_in_the_resolved_recipe(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    res = run_cli([small_cnn_files["model"], "--calib", small_cnn_files["calib"], "-o", out, "-q",
                   "--set", "calibrate.method=percentile", "--set", "calibrate.percentile=99.9"])
    assert res.code == 0, res.err
    steps = {s["type"]: s for s in yaml.safe_load((out / "recipe.resolved.yaml").read_text())["spec"]["passes"]}
    assert steps["calibrate"]["method"] == "percentile" and steps["calibrate"]["percentile"] == 99.9


@pytest.mark.parametrize("setting, words", [
    ("quantize.weight.group_sise=16", ("group_sise", "unknown key")),
    ("gptq.weight.group_size=16", ("no 'gptq' step", "calibrate")),
    ("quantize=3", ("not PASS.KEY=VALUE",)),
    ("calibrate.method=nearest", ("method",)),
])
def test_a_bad_set_is_a_recipe_error_before_any_work(run_cli, small_cnn_files, tmp_path, setting, words):
    res = run_cli([small_cnn_files["model"], "--calib", small_cnn_files["calib"], "-o", tmp_path / "out", "-q",
                   "--set", setting])
    flat = " ".join(res.err.split())
    assert res.code == 4 and res.err.startswith("error: --set") and all(w in flat for w in words), flat
    assert not (tmp_path / "out").exists()


def test_inspect_lists_layers_with_macs_and_what_the_target_would_do(run_cli, small_cnn_files, tmp_path):
    res = run_cli(["inspect", small_cnn_files["model"], "--target", "cpu:avx512_vnni", "--json", tmp_path / "i.json"])
    assert res.code == 0, res.err
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["dynamic_inputs"] == {"x": ["batch", 3, 96, 96]} and info["macs_at"] == {"x": [1, 3, 96, 96]}
    layers = info["layers"]
    graph = onnx.load(str(small_cnn_files["model"])).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    stem = next(n for n in graph.node if n.name == "/stem/conv/Conv")
    cout, cin, kh, kw = weights[stem.input[1]]
    assert layers["/stem/conv/Conv"]["macs"] == 96 * 96 * cout * cin * kh * kw   # stride 1, pad 1: 96x96 out
    floats = {k for k, e in layers.items() if e["plan"] == "float"}
    assert floats == {k for k, e in layers.items() if e["macs"] < load_target("cpu:avx512_vnni").setting("int8_min_macs")}
    assert all("int8 is slower" in layers[k]["reason"] for k in floats)
    # the compile makes the same decisions
    out = tmp_path / "out"
    assert run_cli([small_cnn_files["model"], "--target", "cpu:avx512_vnni", "--calib", small_cnn_files["calib"],
                    "-o", out, "-q", "--no-verify"]).code == 0
    compiled = json.loads((out / "report.json").read_text())["layers"]
    assert {k for k, r in compiled.items() if r["status"] == "float"} == floats


def test_inspect_of_a_missing_file_or_an_unknown_target(run_cli, small_cnn_files, tmp_path):
    res = run_cli(["inspect", tmp_path / "nope.onnx"])
    assert res.code == 3 and "not found" in res.err
    res = run_cli(["inspect", small_cnn_files["model"], "--target", "tpu"])
    assert res.code == 2 and "tpu" in res.err
