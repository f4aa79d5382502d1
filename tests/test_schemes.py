"""Quantization schemes (W4A16, W4A8, W4A4, W8A8 dynamic per-token, FP8, per-group, rounding
modes, mix tables): each against a numpy simulation written here, the cpu lowering
(MatMulNBits, simulated FP8/int4 activations) against the QDQ graph it came from, and
the recipe errors for impossible combinations."""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TinyModels, to_proto
from qcompile.driver import compile_model
from qcompile.errors import EXIT_RECIPE, EXIT_TARGET, RecipeError, TargetError
from qcompile.passes.quantize import Quantize
from qcompile.recipe import builtin_recipes, load_recipe
from qcompile.schemes import mixable_schemes
from qcompile.targets import load_target

CPU = "cpu:avx512_vnni"


# -- independent numpy references -------------------------------------------------------------------
def ref_round(v: np.ndarray, mode: str) -> np.ndarray:
    if mode == "half_even":
        return np.round(v)  # numpy rounds half to even
    if mode == "half_away":
        return np.sign(v) * np.floor(np.abs(v) + 0.5)
    return {"floor": np.floor, "ceil": np.ceil, "trunc": np.trunc}[mode](v)


def ref_int_weight(w: np.ndarray, qmax: int, *, axis: int, block: int | None = None, mode: str = "half_even",
                   full_range: bool = False):
    """Symmetric weights, one scale per channel (`axis`) or per block of `block` rows of a [K, N]
    matrix; returns (int values, dequantized weights) computed column by column. `full_range`:
    the block's largest-magnitude weight maps to -(qmax+1), the scale takes its sign."""
    w = w.astype(np.float64)
    q = np.zeros_like(w)
    deq = np.zeros_like(w)
    if block is None:
        for c in range(w.shape[axis]):
            col = np.take(w, c, axis=axis)
            s = np.float32(np.abs(col).max() / qmax)
            qc = np.clip(ref_round(col.astype(np.float32) / s, mode), -qmax, qmax)
            idx = [slice(None)] * w.ndim
            idx[axis] = c
            q[tuple(idx)], deq[tuple(idx)] = qc, qc * s
        return q, deq
    k, n = w.shape
    for j in range(n):
        for start in range(0, k, block):
            seg = w[start:start + block, j]
            if full_range:
                s = np.float32(seg[np.argmax(np.abs(seg))] / -(qmax + 1))
                qs = np.clip(ref_round(seg.astype(np.float32) / s, mode), -qmax - 1, qmax)
            else:
                s = np.float32(np.abs(seg).max() / qmax)
                qs = np.clip(ref_round(seg.astype(np.float32) / s, mode), -qmax, qmax)
            q[start:start + block, j], deq[start:start + block, j] = qs, qs * s
    return q, deq


def ref_per_token(x: np.ndarray) -> np.ndarray:
    """Row-wise symmetric int8 fake quantization."""
    out = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx].astype(np.float32)
        s = np.float32(max(np.abs(row).max() / np.float32(127), np.float32(1e-12)))
        out[idx] = np.clip(np.round(row / s), -127, 127) * s
    return out


def fp8_fake(x: np.ndarray, scale) -> np.ndarray:
    scaled = np.clip(np.asarray(x, np.float32) / np.float32(scale), -448, 448)
    return scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


# -- helpers ----------------------------------------------------------------------------------------
def run(model, feeds: dict, optimize: bool = True, library=None) -> list[np.ndarray]:
    """Outputs for a batch, one sample at a time (compiled models have batch 1 pinned);
    `library`: the compile's generated-kernel library (OUT/kernels/)."""
    if not isinstance(model, (str, onnx.ModelProto)):
        model = to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if library is not None:
        opts.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    rows = [sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    return [np.concatenate(outs) for outs in zip(*rows)]


def recipe_file(tmp_path, quantize: str, calibrate: bool = True, name: str = "r.yaml") -> str:
    body = "    - type: canonicalize\n" + ("    - type: calibrate\n" if calibrate else "")
    body += "    - type: quantize\n      speed_fallback: false\n" + "".join(
        f"      {line}\n" for line in quantize.strip().splitlines())
    path = tmp_path / name
    path.write_text("apiversion: qcompile/v1\nspec:\n  passes:\n" + body)
    return str(path)


def compile_tiny(tmp_path, model: onnx.ModelProto, recipe: str, data: np.ndarray, name: str = "m",
                 target: str = CPU):
    path, npz = TinyModels.save(model, tmp_path / f"in-{name}", "model", data)
    out = tmp_path / f"out-{name}"
    result = compile_model(path, target=target, recipe=recipe, calib=npz, output_dir=out, progress=False,
                           dump_after=("quantize",), verify_samples=8)
    return onnx.load(out / "model.onnx"), onnx.load(out / "dumps" / next(
        p.name for p in (out / "dumps").iterdir() if "quantize" in p.name)), result.report


def host_matmul_qmax() -> int:
    """The int8 weight range the host's cpu descriptor gives MatMul layers fed uint8: 63 where its
    U8S8 kernels saturate 8-bit weights (AVX2 without VNNI), else 127. Tests that run a compiled
    model's integer kernels compile for the host, so what runs is what the host computes right."""
    saturating = load_target("cpu").setting("u8s8_saturating_ops") or ()
    return 63 if "MatMul" in saturating else 127


def mlp(d_in=64, d_hidden=32, d_out=8, seed=0) -> tuple[onnx.ModelProto, dict]:
    model = TinyModels(seed).mlp(d_in, d_hidden, d_out)
    return model, TinyModels.weights(model)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# -- weight-only int4, per group --------------------------------------------------------------------
@pytest.mark.parametrize("d_in", [64, 48])  # 48: a last, partial group of 16
def test_w4a16_groups_match_numpy_and_lower_to_matmulnbits(tmp_path, d_in):
    model, w = mlp(d_in=d_in)
    x = TinyModels.data((d_in,), 16)
    final, qdq, report = compile_tiny(tmp_path, model, "w4a16", x)
    # the QDQ graph: INT4 weights behind a blocked DequantizeLinear, values as numpy computes them
    inits = {t.name: t for t in qdq.graph.initializer}
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("W1"))
    assert inits[dq.input[0]].data_type == TensorProto.INT4
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    q_ref, _ = ref_int_weight(w["W1"], 7, axis=1, block=32, full_range=True)
    assert q_ref.min() == -8
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64), q_ref)
    # the shipped graph: MatMulNBits for both; fc2 feeds the model output, so w4a16's
    # output_layers gives it int8 per-channel weights (an 8-bit MatMulNBits, its scale repeated
    # over blocks of 32), which the cpu descriptor computes in int8 (no fast float path for 8-bit)
    assert ops(final).count("MatMulNBits") == 2 and "DequantizeLinear" not in ops(final)
    levels = [a.i for n in final.graph.node for a in n.attribute if a.name == "accuracy_level"]
    bits = [a.i for n in final.graph.node for a in n.attribute if a.name == "bits"]
    assert levels == [0, 4] and bits == [4, 8]
    (got,) = run(final, {"x": x})
    # unoptimized: onnxruntime's load-time DQ->MatMul fusion would compute with int8 activations
    (via_qdq,) = run(qdq, {"x": x}, optimize=False)
    _, w1 = ref_int_weight(w["W1"], 7, axis=1, block=32, full_range=True)
    _, w2 = ref_int_weight(w["W2"], 127, axis=1)
    h = np.maximum(x.astype(np.float64) @ w1 + w["b1"], 0)
    np.testing.assert_allclose(via_qdq, h @ w2, rtol=1e-4, atol=1e-4)
    shipped = ref_per_group(h, 32).astype(np.float64) @ w2          # fc2's activations in int8 per group
    np.testing.assert_allclose(got, shipped, rtol=0, atol=1e-5 * np.abs(shipped).max())
    assert "int8 compute" in report["layers"]["/fc2/MatMul"]["note"]
    layer = report["layers"]["/fc1/MatMul"]
    assert layer["scheme"] == "W[int4 g32] A[float]" and layer["kernel"] == "MatMulNBits"
    assert "MatMulNBits" in layer["lowered_to"] and layer["speed_note"]
    assert report["layers"]["/fc2/MatMul"]["scheme"] == "w8a16: W[int8 per_channel] A[float]"


def test_output_layers_scheme_and_mix_precedence(tmp_path):
    """`output_layers` picks the layer feeding the model output from the graph; `float` keeps it
    float with that reason; a `mix` glob naming the layer wins over it."""
    model, _ = mlp(d_in=64)
    x = TinyModels.data((64,), 8)
    float_head = recipe_file(tmp_path, "weight: {dtype: int4, granularity: per_group, group_size: 32}\n"
                                       "activation: null\noutput_layers: float", calibrate=False, name="head-float.yaml")
    _, _, report = compile_tiny(tmp_path, model, float_head, x, name="a")
    assert report["layers"]["/fc2/MatMul"] == {"op": "MatMul", "status": "float", "reason": "output_layers: float"}
    assert report["layers"]["/fc1/MatMul"]["weight"] == "int4 g32"
    mixed = recipe_file(tmp_path, "weight: {dtype: int4, granularity: per_group, group_size: 32}\n"
                                  "activation: null\noutput_layers: float\nmix: {'/fc2/*': w4a16}", calibrate=False, name="head-mix.yaml")
    _, _, report = compile_tiny(tmp_path, model, mixed, x, name="b")
    assert report["layers"]["/fc2/MatMul"]["scheme"].startswith("w4a16: W[int4 g32]")


def test_weight_bytes_and_compression_in_report(tmp_path):
    model, w = mlp(d_in=64, d_hidden=32, d_out=8)
    _, _, report = compile_tiny(tmp_path, model, "w4a16", TinyModels.data((64,), 8))
    layer = report["layers"]["/fc1/MatMul"]
    # 64x32 int4 values (1024 bytes) + 2x32 float32 group scales (256 bytes), symmetric: no zero points
    assert layer["weight_bytes"] == {"float": 64 * 32 * 4, "quantized": 64 * 32 // 2 + 2 * 32 * 4}
    total = report["quantize"]["weights"]
    floats = 64 * 32 * 4 + 32 * 8 * 4
    quantized = (64 * 32 // 2 + 2 * 32 * 4) + (32 * 8 + 8 * 4)   # fc2, the output layer: int8 per channel
    assert (total["float_bytes"], total["quantized_bytes"]) == (floats, quantized)
    assert total["compression"] == round(floats / quantized, 3)


# -- dynamic per-token W8A8 -------------------------------------------------------------------------
def test_w8a8_dynamic_per_token_matches_numpy(tmp_path):
    model, w = mlp(d_in=16, d_hidden=32, d_out=8)
    x = TinyModels.data((16,), 8) * np.linspace(0.1, 10, 8, dtype=np.float32)[:, None]  # rows differ in range
    final, _, report = compile_tiny(tmp_path, model, "w8a8-dynamic", x, target="cpu")   # runs here: the host's
    assert ops(final) == ["QMatMulPerToken", "Relu", "QMatMulPerToken"]    # generated kernels (cpu_kernels)
    (got,) = run(final, {"x": x}, library=tmp_path / "out-m" / "kernels" / "libqcompile_kernels.so")
    qmax = host_matmul_qmax()
    _, w1 = ref_int_weight(w["W1"], qmax, axis=1)
    _, w2 = ref_int_weight(w["W2"], qmax, axis=1)
    h = np.maximum(ref_per_token(x) @ w1 + w["b1"], 0)
    expect = ref_per_token(h) @ w2
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert report["layers"]["/fc1/MatMul"]["activation"] == "int8 dynamic per_token"
    assert report["layers"]["/fc1/MatMul"]["kernel"] == "QMatMulPerToken"


def test_dynamic_conv_uses_per_tensor_convinteger(tmp_path, tiny):
    model = tiny.conv_bn_relu()
    x = TinyModels.data((3, 8, 8), 4)
    final, _, report = compile_tiny(tmp_path, model, "w8a8-dynamic", x)
    assert "ConvInteger" in ops(final) and "DynamicQuantizeLinear" in ops(final)
    (got,) = run(final, {"x": x})
    (ref,) = run(model, {"x": x})
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 30
    assert "per_tensor" in report["layers"]["/conv/Conv"]["note"]
    assert report["layers"]["/conv/Conv"]["scheme"].endswith("A[uint8 dynamic per_tensor]")


# -- FP8 and int4 activations: QDQ graph and its cpu simulation --------------------------------------
def test_fp8_matches_numpy_and_cpu_form_matches_qdq(tmp_path, tiny):
    model = tiny.gemm(d_in=16, d_out=8)
    w = TinyModels.weights(model)
    x = TinyModels.data((16,), 8)
    final, qdq, report = compile_tiny(tmp_path, model, "fp8", x)
    assert onnx.defs.onnx_opset_version() >= 19 and qdq.opset_import[0].version >= 19
    q_nodes = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    x_scale = float(inits[q_nodes[0].input[1]])
    assert x_scale == pytest.approx(np.abs(x).max() / 448, rel=1e-6)
    w_scale = np.abs(w["W"]).max(axis=1) / 448
    w_fq = fp8_fake(w["W"] / w_scale[:, None], 1.0) * w_scale[:, None]
    expect = fp8_fake(x, x_scale).astype(np.float64) @ w_fq.T + w["b"]
    (via_qdq,) = run(qdq, {"x": x}, optimize=False)  # onnxruntime's optimizer cannot load FP8 QDQ
    np.testing.assert_allclose(via_qdq, expect, rtol=1e-4, atol=1e-5)
    assert "QuantizeLinear" not in ops(final) and "Cast" in ops(final)
    (got,) = run(final, {"x": x})
    np.testing.assert_allclose(got, via_qdq, rtol=1e-5, atol=1e-6)
    assert report["cpu_forms"]["simulated_activation_qdq"] == {"float8": 1}  # x; y is a plain graph output
    assert "FP8" in report["layers"]["/fc/Gemm"]["speed_note"]


def test_w4a4_runs_in_onnxruntime_as_its_qdq_graph(tmp_path, tiny):
    model = tiny.conv_bn_relu()
    x = TinyModels.data((3, 8, 8), 8)
    final, qdq, report = compile_tiny(tmp_path, model, "w4a4", x)
    (got,) = run(final, {"x": x})  # int4 Q after ReLU: the load-time fusion that throws is avoided
    (via_qdq,) = run(qdq, {"x": x}, optimize=False)
    np.testing.assert_allclose(got, via_qdq, rtol=1e-5, atol=1e-6)
    assert report["cpu_forms"]["simulated_activation_qdq"].get("int4", 0) >= 1


# -- rounding modes and stochastic rounding ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["half_even", "half_away", "floor", "ceil", "trunc"])
def test_weight_rounding_modes(tmp_path, mode):
    model, w = mlp(d_in=16)
    recipe = recipe_file(tmp_path, f"weight: {{dtype: int8, rounding: {mode}}}\nactivation: null", calibrate=False)
    _, qdq, _ = compile_tiny(tmp_path, model, recipe, TinyModels.data((16,), 4))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    q_ref, _ = ref_int_weight(w["W1"], 127, axis=1, mode=mode)
    np.testing.assert_array_equal(inits["W1_quantized"].astype(np.int64), q_ref)


def _stochastic_weights(tmp_path, seed: int, tag: str) -> np.ndarray:
    model, _ = mlp(d_in=16)
    recipe = recipe_file(tmp_path, f"weight: {{dtype: int4, granularity: per_channel, rounding: stochastic, "
                                   f"seed: {seed}}}\nactivation: null", calibrate=False, name=f"{tag}.yaml")
    _, qdq, _ = compile_tiny(tmp_path, model, recipe, TinyModels.data((16,), 4), name=tag)
    return {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}["W1_quantized"].astype(np.int64)


def test_stochastic_rounding_is_seeded(tmp_path):
    _, w = mlp(d_in=16)
    a, b, c = (_stochastic_weights(tmp_path, s, t) for s, t in ((1, "a"), (1, "b"), (2, "c")))
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    s = (np.abs(w["W1"]).max(axis=0) / 7).astype(np.float32)
    v = w["W1"].astype(np.float32) / s
    assert np.all((a == np.floor(v)) | (a == np.ceil(v)))  # only ever rounds to a neighbour


# -- mix tables ---------------------------------------------------------------------------------------
def test_mix_table_gives_each_scope_its_scheme(tmp_path, tiny):
    model = tiny.shared_input(d_in=64)
    recipe = recipe_file(tmp_path, 'mix: {"/b/*": w4a16}')
    final, qdq, report = compile_tiny(tmp_path, model, recipe, TinyModels.data((64,), 16))
    assert report["layers"]["/a/MatMul"]["scheme"].startswith("W[int8 per_channel] A[uint8")
    assert report["layers"]["/b/MatMul"]["scheme"] == "w4a16: W[int4 g32] A[float]"
    b = next(n for n in qdq.graph.node if n.name == "/b/MatMul")
    assert b.input[0] == "x"  # the weight-only layer reads the float input, not the Q/DQ'd one
    assert "MatMulNBits" in ops(final)

    recipe = recipe_file(tmp_path, 'mix: {"/a/*": float}', name="float.yaml")
    _, _, report = compile_tiny(tmp_path, model, recipe, TinyModels.data((64,), 16), name="f")
    assert report["layers"]["/a/MatMul"] == {"op": "MatMul", "status": "float", "reason": "mix: float"}


# -- recipe errors before any work --------------------------------------------------------------------
@pytest.mark.parametrize("quantize,key,words", [
    ("weight: {dtype: int3}", "weight.dtype", ["int3"]),
    ("weight: {dtype: float8e4m3fn, symmetric: false}\nactivation: {dtype: float8e4m3fn}", "weight.symmetric",
     ["symmetric"]),
    ("weight: {dtype: float8e4m3fn, rounding: floor}\nactivation: {dtype: float8e4m3fn}", "weight.rounding",
     ["nearest even"]),
    ("activation: {dtype: int4, granularity: per_token}", "activation.dtype", ["8-bit"]),
    ("activation: {dtype: uint8, granularity: per_token}", "activation.dtype", ["per_token", "int8"]),
    ("weight: {granularity: per_group, group_size: 1}\nactivation: null", "weight.group_size", ["at least 2"]),
    ("weight: {dtype: int4}\nactivation: {granularity: per_token}", "weight", ["int8"]),
    ("weight: {dtype: float8e4m3fn}", "activation.dtype", ["FP8"]),
    ('mix: {"*attn*": w9a9}', "mix.*attn*", ["w9a9", "w4a16", "float"]),
])
def test_impossible_schemes_are_recipe_errors(tmp_path, run_cli, tiny, quantize, key, words):
    path, npz = TinyModels.save(tiny.mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    out = tmp_path / "out"
    res = run_cli([path, "--target", CPU, "--recipe", recipe_file(tmp_path, quantize), "--calib", npz, "-o", out])
    assert res.code == EXIT_RECIPE, res.err
    assert f"key '{key}'" in res.err, res.err
    for word in words:
        assert word in " ".join(res.err.split()), res.err
    assert not out.exists()


def test_mixable_schemes_are_the_plain_recipes():
    assert set(mixable_schemes()) == set(builtin_recipes()) - {"w8a8-mix", "w8a8-smooth", "w4a16-gptq", "w4a16-awq", "w8a8-fa3", "w8a8-kv8",
                                                          "w8a8-cnn", "w8a8-cle", "w8a8sc",
                                                          "prequantized"} | {"float"}


def test_fp8_is_refused_where_the_opset_lacks_it(tmp_path):
    recipe = load_recipe("fp8")
    step = next(s for s in recipe.steps if s.spec.name == "quantize")
    old = dataclasses.replace(load_target(CPU), opset_convert_to=17)
    problem = Quantize.check_target(step.config, old)
    assert "opset 19" in problem and "17" in problem
    assert Quantize.check_target(step.config, load_target(CPU)) is None


@pytest.mark.parametrize("recipe", ["fp8", "w4a16", "w8a8-dynamic", "w4a4"])
def test_ascend310b_refuses_schemes_it_cannot_run(tmp_path, run_cli, tiny, recipe):
    path, npz = TinyModels.save(tiny.mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    out = tmp_path / "out"
    res = run_cli([path, "--target", "ascend310b", "--recipe", recipe, "--calib", npz, "-o", out])
    assert res.code == EXIT_TARGET, res.err
    assert "Traceback" not in res.err and not out.exists()


def test_ascend_checks_the_schemes_a_mix_names(tmp_path):
    path = recipe_file(tmp_path, 'weight: {dtype: int8}\nactivation: {dtype: int8, symmetric: true}\n'
                                 'mix: {"*fc2*": fp8}')
    from qcompile.plan import prepare
    with pytest.raises(TargetError, match=r"\*fc2\*.*fp8"):
        prepare("ascend310b", path)


# -- every built-in recipe compiles and runs ------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
def test_every_builtin_recipe_compiles_and_runs(tmp_path, recipe):
    d = 64 if recipe in ("w4a16-gptq", "w4a16-awq") else 1024  # 1024: fc1 has the 1M MACs cpu's int8 layers need
    model, _ = mlp(d_in=d, d_hidden=d)
    x = TinyModels.data((d,), 128 if d == 64 else 8)  # GPTQ: at least a row per channel
    if recipe == "w8a8sc":  # SparseGPT's Hessians too: 16 rows per sample, [batch, 16, d]
        for value in (model.graph.input[0], model.graph.output[0]):
            value.type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=16))
        x = TinyModels.data((16, d), 72)
    if recipe == "w8a8-kv8":  # decoders only (tests/test_kv_cache.py): the MLP has no KV cache
        with pytest.raises(RecipeError, match="no past/present"):
            compile_tiny(tmp_path, model, recipe, x)
        return
    if recipe == "prequantized":  # takes a model that is already quantized: the w8a8 compile's, lowered as it is
        quantized, _, _ = compile_tiny(tmp_path, model, "w8a8", x, name="w8a8")
        path, npz = TinyModels.save(quantized, tmp_path / "in-pre", "model", x)
        report = compile_model(path, target=CPU, recipe=recipe, calib=npz, output_dir=tmp_path / "out-pre",
                               progress=False, verify_samples=8).report
        final = onnx.load(tmp_path / "out-pre" / "model.onnx")
    else:
        final, _, report = compile_tiny(tmp_path, model, recipe, x)
    library = tmp_path / "out-m" / "kernels" / "libqcompile_kernels.so"   # w8a8-dynamic: generated kernels
    assert library.is_file() == any(n.domain == "com.qcompile" for n in final.graph.node)
    (got,) = run(final, {"x": x}, library=library if library.is_file() else None)
    (ref,) = run(model, {"x": x})
    assert np.all(np.isfinite(got)) and got.shape == ref.shape
    # 4-bit weights on a random MLP: about 20 dB per layer, so a lower floor than for 8 bits;
    # 2:4 pruning of iid Gaussian weights removes about a tenth of each layer's energy (two layers: ~0.82)
    floor = 0.9 if recipe == "w4a4" else 0.8 if recipe == "w8a8sc" else 0.98 if recipe.startswith("w4") else 0.99
    assert report["verification"]["outputs"]["y"]["cosine_mean"] > floor
    quantized = [r for r in report["layers"].values() if r["status"] == "quantized"]
    assert quantized and all(r["scheme"] and r["weight_bytes"]["quantized"] < r["weight_bytes"]["float"]
                             for r in quantized)
    json.dumps(report)


def test_dynamic_layers_in_a_chain(tmp_path, tiny):
    """Conv -> Conv, both dynamic: the second reads the first's replacement output."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.standard_normal((4, 3, 3, 3)) * 0.3, "W2": rng.standard_normal((5, 4, 3, 3)) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "W2"], ["y"], name="/c2/Conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = TinyModels.data((3, 8, 8), 4)
    final, _, report = compile_tiny(tmp_path, model, "w8a8-dynamic", x)
    assert ops(final).count("ConvInteger") == 2
    (got,) = run(final, {"x": x})
    (ref,) = run(model, {"x": x})
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 25


def test_conv_weights_in_groups_along_input_channels(tmp_path):
    """W4A16 on a Conv with 64 input channels: blocks of 32 input channels per output channel and
    kernel tap (ONNX blocked DequantizeLinear on axis 1); a 3-channel Conv stays per channel."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 64, 3, 3)) * 0.2).astype(np.float32)
    w0 = (rng.standard_normal((64, 3, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W0"], ["h"], name="/c0/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W"], ["c"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]   # so c1 is not w4a16's output layer (int8)
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w0, "W0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = TinyModels.data((3, 8, 8), 4)
    final, qdq, report = compile_tiny(tmp_path, model, "w4a16", x)
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_quantized")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1, "block_size": 32}
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    q = inits["W_quantized"].astype(np.int64)
    for o in range(8):
        for b in range(2):
            for i in range(3):
                for j in range(3):
                    seg = w[o, 32 * b:32 * b + 32, i, j].astype(np.float64)
                    s = np.float32(seg[np.argmax(np.abs(seg))] / -8.0)
                    np.testing.assert_array_equal(q[o, 32 * b:32 * b + 32, i, j],
                                                  np.clip(np.rint(seg.astype(np.float32) / s), -8, 7))
    assert report["layers"]["/c1/Conv"]["weight"] == "int4 g32"
    assert report["layers"]["/c0/Conv"]["weight"] == "int4 per_channel"
    assert "fewer input channels" in report["layers"]["/c0/Conv"]["note"]
    (got,) = run(final, {"x": x})
    (ref,) = run(model, {"x": x})
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 15


# -- per-group activations inside the kernel (w8a8-group, w4a8) -----------------------------------------
def ref_per_group(x: np.ndarray, group: int) -> np.ndarray:
    """Each row of x in blocks of `group` along the last axis, symmetric int8 with the block's
    max|x| / 127, rounded half to even (what MatMulNBits' int8-compute path does)."""
    x = x.astype(np.float32)
    k = x.shape[-1]
    out = np.empty_like(x)
    for start in range(0, k, group):
        seg = x[..., start:start + group]
        s = np.abs(seg).max(axis=-1, keepdims=True) / np.float32(127)
        s = np.where(s == 0, np.float32(1), s)
        out[..., start:start + group] = np.clip(np.rint(seg / s), -127, 127) * s
    return out


@pytest.mark.parametrize("recipe,bits", [("w8a8-group", 8), ("w4a8", 4)])
def test_per_group_activations_run_in_the_int8_kernel_and_match_numpy(tmp_path, recipe, bits):
    """Weights in groups of 32 (int8, or int4 full range) and activations quantized per group of
    32 at run time inside MatMulNBits (accuracy_level 4): no activation Q/DQ in the graph, the
    output as numpy computes it with both quantized (the output layer keeps int8 weights)."""
    model, w = mlp(d_in=64, d_hidden=64)
    x = TinyModels.data((64,), 8) * np.linspace(0.1, 10, 64, dtype=np.float32)   # channels differ in range
    final, _, report = compile_tiny(tmp_path, model, recipe, x)
    assert ops(final) == ["MatMulNBits", "Add", "Relu", "MatMulNBits"]
    assert [a.i for n in final.graph.node for a in n.attribute if a.name == "accuracy_level"] == [4, 4]
    q1 = ref_int_weight(w["W1"], 127 if bits == 8 else 7, axis=1, block=32, full_range=bits == 4)[1]
    q2 = ref_int_weight(w["W2"], 127, axis=1, block=32)[1]
    h = np.maximum(ref_per_group(x, 32).astype(np.float64) @ q1 + w["b1"], 0)
    expect = ref_per_group(h, 32).astype(np.float64) @ q2
    (got,) = run(final, {"x": x})
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5 * np.abs(expect).max())
    layer = report["layers"]["/fc1/MatMul"]
    assert layer["activation"] == "int8 dynamic per_group" and layer["kernel"] == "MatMulNBits"


def test_per_group_activations_need_per_group_weights_and_a_target_that_has_them(tmp_path, run_cli):
    bad = recipe_file(tmp_path, "weight: {dtype: int8, granularity: per_channel}\n"
                                "activation: {dtype: int8, granularity: per_group}", calibrate=False)
    path, npz = TinyModels.save(mlp()[0], tmp_path, "m", TinyModels.data((64,), 4))
    res = run_cli([path, "--recipe", bad, "-o", tmp_path / "o1"])
    assert res.code == EXIT_RECIPE and "per_group activations" in res.err
    res = run_cli([path, "--target", "ascend310b", "--recipe", "w8a8-group", "--calib", npz, "-o", tmp_path / "o2"])
    assert res.code == EXIT_TARGET and "per_group" in res.err


def test_an_outer_product_is_not_a_layer(tmp_path):
    """MatMul(positions [.., 1], frequencies [1, F]) — the rotary table fuse writes — sums over
    one element: quantize and GPTQ leave it float with the reason."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "F"], ["t"], name="/rotary/MatMul"),
             helper.make_node("Cos", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng.uniform(0, 1, (1, 64)).astype(np.float32), "F")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, _, report = compile_tiny(tmp_path, model, "w8a16", TinyModels.data((4, 1), 4))
    record = report["layers"]["/rotary/MatMul"]
    assert record["status"] == "float" and "outer product" in record["reason"]
    from qcompile.model_io import load_model
    from qcompile.passes.hessians import is_linear
    path, _ = TinyModels.save(model, tmp_path, "outer")
    assert not any(is_linear(n) for n in load_model(path).graph)
