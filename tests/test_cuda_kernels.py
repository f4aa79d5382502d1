"""Generated CUDA kernels (backends/cuda/kernels/*.cu.j2, backends/cuda/cuda_kernels.py).

No GPU here or in CI, so what can be checked without one is: every template renders for a grid
of specs and nvcc compiles it for sm_80 and for sm_90a (each C prototype against its
definition, the onnxruntime wrapper against onnxruntime's headers); the harness's numpy
references (check.py, what a GPU run is judged by) agree with independent implementations of
the same arithmetic — the CPU family's kernels for the same ops, onnxruntime's blocked int4
DequantizeLinear; a `cuda` compile writes model.kernels.onnx (verified through the CPU
kernels of the same ops) and OUT/kernels/ with real layer inputs; nvcc failing leaves the
sources and the command. On a machine with a CUDA device and PyTorch, the last test runs the
harness for real.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_harness import session
from qcompile.backends.cpu.generated_kernels import TEMPLATES as CPU_TEMPLATES
from qcompile.backends.cpu.per_token_matmul import qmatmul_spec
from qcompile.backends.cuda.cuda_kernels import ARCHITECTURES, KERNELS_MODEL, TEMPLATES, kernel_spec
from qcompile.driver import compile_model
from qcompile.kernelgen import KernelSpec
from qcompile.kernelgen.build import CUDA_LIBRARY, build, build_cuda
from qcompile.kernelgen.cutlass_headers import find_cutlass
from qcompile.kernelgen.ort_headers import find_headers
from qcompile.kernelgen.render import render_sources

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")
LIBRARY_TEMPLATES = ("qcompile_cuda_kernels.h.j2", "ort_ops.cu.j2")


def _harness_module(name: str):
    """check.py or check_references.py as OUT/kernels/ has them (not a package: loaded from the file)."""
    sys.path.insert(0, str(TEMPLATES))                  # check.py imports check_references.py beside it
    spec = importlib.util.spec_from_file_location(f"qcompile_cuda_{name}", TEMPLATES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _harness_module("check")
reference = _harness_module("check_references")


def grid(variant: str) -> list[KernelSpec]:
    """Every template, with each option it has: activation dtypes, epilogues, output dtypes,
    signed and zero-point int4, both KV-cache codecs, head dims 64 and 128 (LLM shapes)."""
    gemm = {"activation": "int8", "weight": "int8"}
    return [
        kernel_spec("QuantizePerToken", {"activation": "float32"}, {"K": 384}, variant),
        kernel_spec("QuantizePerToken", {"activation": "float16"}, {"K": 4096}, variant, "rms_norm"),
        kernel_spec("QGemmW8A8", {**gemm, "output": "float32"}, {"K": 384, "N": 1536}, variant, "bias+gelu",
                  "per_token x per_channel"),
        kernel_spec("QGemmW8A8", {**gemm, "output": "float16"}, {"K": 4096, "N": 11008}, variant, "",
                  "per_token x per_channel"),
        kernel_spec("QGemmW4A16", {"activation": "float16", "weight": "int4"}, {"K": 4096, "N": 4096, "G": 128},
                  variant, "bias", "per_group"),
        kernel_spec("QGemmW4A16", {"activation": "float32", "weight": "uint4"}, {"K": 576, "N": 1536, "G": 32},
                  variant, "", "per_group+zero_point"),
        kernel_spec("QAttentionInt8", {"activation": "float16"}, {"head_dim": 128, "heads": 32}, variant),
        kernel_spec("QAttentionInt8", {"activation": "float32"}, {"head_dim": 64, "heads": 12}, variant),
        kernel_spec("QAttentionKVCache", {"activation": "float32"}, {"head_dim": 64, "q_heads": 9, "kv_heads": 3},
                  variant, layout="per_channel"),
        kernel_spec("QAttentionKVCache", {"activation": "float16"}, {"head_dim": 128, "q_heads": 32, "kv_heads": 8},
                  variant, layout="per_head"),
    ]


def _exported(library: Path) -> set[str]:
    done = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in done.stdout.splitlines() if " T " in line}


@needs_nvcc
@pytest.mark.parametrize("variant", ["sm80", "sm90"])
def test_every_template_compiles_with_nvcc(variant):
    """The grid for one architecture (sm_80: CUTLASS 2 mma.sync; sm_90a: CUTLASS 3 wgmma), the C
    header every unit includes, and the onnxruntime CUDA wrapper, into one library."""
    specs = grid(variant)
    sources = render_sources(TEMPLATES, specs, "test", unit="cu", library_templates=LIBRARY_TEMPLATES)
    library = build_cuda(sources, ARCHITECTURES[variant], (find_cutlass().include_dir, find_headers().include_dir))
    exported = _exported(library.path)
    wanted = {s.symbol for s in specs} | {f"{s.symbol}_workspace" for s in specs if s.op.startswith("QAttention")}
    assert wanted | {"RegisterCustomOps"} <= exported
    header = sources["qcompile_cuda_kernels.h"]
    assert all(s.symbol in header for s in specs)


def test_templates_differ_by_what_the_spec_says():
    """The rendering reads the spec: the sm90 GEMM is the CUTLASS 3 one, the epilogue follows
    `epilogue`, int4 signedness and zero points follow dtypes and layout."""
    gemm = {"activation": "int8", "weight": "int8", "output": "float32"}
    files = render_sources(TEMPLATES, [kernel_spec("QGemmW8A8", gemm, {"K": 64, "N": 64}, "sm90", "bias+gelu"),
                                       kernel_spec("QGemmW8A8", gemm, {"K": 64, "N": 64}, "sm80", "")], "t", unit="cu",
                           library_templates=())
    sm90, sm80 = (text for name, text in sorted(files.items(), key=lambda kv: "Sm90EVT" not in kv[1])
                  if name.endswith(".cu"))
    assert "KernelTmaWarpSpecializedPingpong" in sm90 and "thread::GELU" in sm90 and "using Bias =" in sm90
    assert "Sm80EVT" in sm80 and "thread::GELU" not in sm80 and "using Bias =" not in sm80
    w4 = render_sources(TEMPLATES, [kernel_spec("QGemmW4A16", {"activation": "float16", "weight": "uint4"},
                                              {"K": 64, "N": 64, "G": 32}, "sm80", "", "per_group+zero_point")],
                        "t", unit="cu", library_templates=())
    text = next(t for n, t in w4.items() if n.endswith(".cu"))
    assert "zero_point + " in text and "0xFu" in text and "__half" in text


# ------------------------------------------------------------------- the harness's references

def test_w8a8_reference_is_the_cpu_kernels_arithmetic(monkeypatch):
    """check.py's per-token quantization + W8A8 GEMM reference against the CPU family's
    QMatMulPerToken (the op model.kernels.onnx runs; numpy-checked in test_generated_kernels)."""
    k, n = 96, 40
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    spec = qmatmul_spec(ir.Value(const_value=ir.tensor(w)), "avx512_vnni")
    library = build(render_sources(CPU_TEMPLATES, [spec], "test"), find_headers()).path
    node = helper.make_node("QMatMulPerToken", ["x", "w", "ws", "b"], ["y"], domain="com.qcompile", spec=spec.id)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, name) for a, name in ((w, "w"), (ws, "ws"), (b, "b"))])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.qcompile", 1)])
    sess = session(model.SerializeToString(), library, "scalar", monkeypatch)
    x = (rng.standard_normal((7, k)) * rng.choice([0.01, 1, 300], size=(7, 1))).astype(np.float32)
    q, s = reference.ref_quantize_per_token(x, None, 0.0)
    want = reference.ref_gemm_w8a8(q, np.ascontiguousarray(w.T), s, ws, b, "bias")
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_w4a16_reference_is_onnx_blocked_dequantization():
    """check.py's unpacking of ONNX int4 (low nibble first), group scales and zero points against
    onnxruntime's DequantizeLinear (opset 21, block_size) + MatMul on the same packed bytes."""
    k, n, g = 64, 24, 16
    rng = np.random.default_rng(6)
    for signed, zp in ((True, False), (False, True)):
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        lo, hi = (-8, 8) if signed else (0, 16)
        w = rng.integers(lo, hi, (k, n))
        scale = (rng.random((k // g, n)) * 0.05 + 0.01).astype(np.float32)
        zps = rng.integers(lo, hi, (k // g, n)) if zp else None
        inits = [helper.make_tensor("w", dtype, (k, n), w.reshape(-1).tolist()),
                 numpy_helper.from_array(scale, "s")]
        inputs = ["w", "s"]
        if zp:
            inits.append(helper.make_tensor("z", dtype, (k // g, n), zps.reshape(-1).tolist()))
            inputs.append("z")
        nodes = [helper.make_node("DequantizeLinear", inputs, ["wd"], axis=0, block_size=g),
                 helper.make_node("MatMul", ["x", "wd"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
        x = rng.standard_normal((3, k)).astype(np.float32)
        opts = ort.SessionOptions()     # unfused: onnxruntime would fold DQ + MatMul into its MatMulNBits
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        want = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
                                    ).run(None, {"x": x})[0]
        packed = _packed(w)
        unpacked = reference.unpack_int4(packed, (k, n), signed)
        np.testing.assert_array_equal(unpacked, w)
        got = reference.ref_w4a16(x, unpacked, scale, reference.unpack_int4(_packed(zps), (k // g, n), signed) if zp else None,
                              None, g)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _packed(values: np.ndarray) -> np.ndarray:
    """ONNX's int4 packing, written independently of check.py: element i in byte i // 2, low nibble first."""
    flat = (values.reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def test_kv_cache_reference_is_the_cpu_kernels_arithmetic(monkeypatch):
    """check.py's int8-cache decode reference against the CPU family's QAttentionKVCache: the
    appended cache bit for bit, the attention to float rounding."""
    d, qh, kvh = 16, 4, 2
    spec = KernelSpec(op="QAttentionKVCache", family="cpu", isa="avx512_vnni",
                      dtypes=(("query", "float32"), ("cache", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", d), ("q_heads", qh), ("kv_heads", kvh)),
                      dynamic_dims=("batch", "seq", "past"), scale_layout="per_channel", epilogue="attention_bias")
    library = build(render_sources(CPU_TEMPLATES, [spec], "test"), find_headers()).path
    rng = np.random.default_rng(7)
    ks, vs = ((rng.random((1, kvh, 1, d)) * 0.05 + 0.005).astype(np.float32) for _ in range(2))
    names = ["q", "k", "v", "past_k", "past_v", "k_scale", "v_scale", "bias"]
    node = helper.make_node("QAttentionKVCache", names, ["out", "pk", "pv"], domain="com.qcompile", spec=spec.id,
                            scale=0.25)
    types = {"q": 1, "k": 1, "v": 1, "past_k": 3, "past_v": 3, "bias": 1}
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types[n], None) for n in types],
                              [helper.make_tensor_value_info(n, t, None) for n, t in (("out", 1), ("pk", 3), ("pv", 3))],
                              [numpy_helper.from_array(ks, "k_scale"), numpy_helper.from_array(vs, "v_scale")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.qcompile", 1)])
    b, s, p = 2, 3, 9
    feeds = {"q": rng.standard_normal((b, s, qh * d)).astype(np.float32),
             "k": (rng.standard_normal((b, kvh, s, d)) * 2).astype(np.float32),
             "v": (rng.standard_normal((b, kvh, s, d)) * 2).astype(np.float32),
             "past_k": rng.integers(-128, 128, (b, kvh, p, d)).astype(np.int8),
             "past_v": rng.integers(-128, 128, (b, kvh, p, d)).astype(np.int8)}
    causal = np.arange(p + s)[None, :] > (p + np.arange(s))[:, None]
    feeds["bias"] = np.where(causal, np.finfo(np.float32).min, 0).astype(np.float32)[None, None].repeat(b, 0)
    out, pk, pv = session(model.SerializeToString(), library, "scalar", monkeypatch).run(None, feeds)
    want, want_k, want_v = reference.ref_kv_attention(feeds["q"], feeds["k"], feeds["v"], feeds["past_k"], feeds["past_v"],
                                                  ks.reshape(kvh, d), vs.reshape(kvh, d), feeds["bias"], 0.25, qh, kvh, d)
    np.testing.assert_array_equal(pk, want_k)
    np.testing.assert_array_equal(pv, want_v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_int8_attention_reference_is_the_cpu_kernels_arithmetic(monkeypatch):
    """check.py's FA3 reference against the CPU family's QAttentionInt8 (per-head scales, a mask)."""
    d, heads = 16, 4
    spec = KernelSpec(op="QAttentionInt8", family="cpu", isa="avx512_vnni",
                      dtypes=(("query", "float32"), ("qkv", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", d), ("heads", heads)), dynamic_dims=("batch", "seq", "kv_seq"),
                      scale_layout="per_head", epilogue="attention_bias")
    library = build(render_sources(CPU_TEMPLATES, [spec], "test"), find_headers()).path
    rng = np.random.default_rng(8)
    scales = [(rng.random(heads) * 0.01 + 0.02).astype(np.float32) for _ in range(3)]
    names = ["q", "k", "v", "q_scale", "k_scale", "v_scale", "bias"]
    node = helper.make_node("QAttentionInt8", names, ["out"], domain="com.qcompile", spec=spec.id, scale=0.25)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, 1, None) for n in names if "scale" not in n],
                              [helper.make_tensor_value_info("out", 1, None)],
                              [numpy_helper.from_array(s, n) for s, n in zip(scales, names[3:6])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.qcompile", 1)])
    b, s, t = 2, 5, 11
    feeds = {name: rng.standard_normal((b, length, heads * d)).astype(np.float32)
             for name, length in (("q", s), ("k", t), ("v", t))}
    bias = (rng.standard_normal((b, 1, s, t)) * 0.5).astype(np.float32)
    bias[rng.random(bias.shape) < 0.3] = np.finfo(np.float32).min
    bias[..., 0] = 0.0
    feeds["bias"] = bias
    (out,) = session(model.SerializeToString(), library, "scalar", monkeypatch).run(None, feeds)
    want = reference.ref_attention_int8(feeds["q"], feeds["k"], feeds["v"], *scales, bias, 0.25, heads, d)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


# ------------------------------------------------------------------- the lowering

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from models import bert_block
    folder = tmp_path_factory.mktemp("bert")
    bert_block.write_with_data(folder, "bert.onnx", bert_block.build(), bert_block.sample_inputs, 0)
    return folder


def _compile(bert, out, settings=("cuda_kernels.build=false",), recipe="w8a8-smooth", **kw):
    return compile_model(bert / "bert.onnx", target="cuda", recipe=recipe, calib=bert / "calib.npz",
                         verify_data=bert / "eval.npz", output_dir=out, progress=False, verify_samples=16,
                         settings=settings, **kw)


def test_a_cuda_compile_writes_the_kernel_graph_and_its_sources(bert, tmp_path):
    result = _compile(bert, tmp_path / "out")
    out = tmp_path / "out"
    section = result.sections["cuda_kernels"]
    assert section["served"] == 12 and section["not_served"] == {}
    kernels_graph = ir.load(out / KERNELS_MODEL)
    qmatmuls = [n for n in kernels_graph.graph if n.op_type == "QMatMulPerToken" and n.domain == "com.qcompile"]
    assert len(qmatmuls) == 12
    assert not any(n.op_type == "MatMul" and n.inputs[1].producer() is not None and
                   n.inputs[1].producer().op_type == "DequantizeLinear" for n in kernels_graph.graph)
    assert kernels_graph.metadata_props["qcompile.kernels.cuda_library"] == f"kernels/{CUDA_LIBRARY}"
    assert "qcompile.kernels.library" not in kernels_graph.metadata_props   # not a CPU session's library
    plain = ir.load(out / "model.onnx")                       # TensorRT's graph is untouched
    assert not any(n.domain == "com.qcompile" for n in plain.graph)
    # verified: the per-token kernels against the original, as model.onnx is
    companion = result.verification["companions"][KERNELS_MODEL]
    first = next(iter(companion["outputs"].values()))
    assert first["sqnr_db"] > 20 and companion["checked"].startswith("the generated-kernel graph")
    # OUT/kernels: sources, header, CMake, manifest (graph spec -> kernels), real layer inputs, the harness
    folder = out / "kernels"
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["kernels"]:
        assert (folder / f"{entry['spec']['op']}_{entry['id']}.cu").is_file()
    assert {k["op"] for k in manifest["graph_ops"].values()} == {"QMatMulPerToken"}
    assert set(manifest["graph_ops"]) == {n.attributes["spec"].value for n in qmatmuls}
    assert "CMAKE_CUDA_ARCHITECTURES 90a" in (folder / "CMakeLists.txt").read_text()
    assert (folder / "check.py").is_file() and (folder / "BUILD.txt").is_file()
    assert "nvcc" in (folder / "BUILD.txt").read_text()
    with np.load(folder / "layers.npz") as layers:
        gemm = next(e for e in manifest["kernels"] if e["spec"]["op"] == "QGemmW8A8")
        x, w = layers[f"{gemm['id']}/x"], layers[f"{gemm['id']}/weight_nk"]
        ws, bias = layers[f"{gemm['id']}/weight_scale"], layers[f"{gemm['id']}/bias"]
        recorded_out = layers[f"{gemm['id']}/layer_output"]
        assert x.shape[1] == gemm["spec"]["static_dims"]["K"] and w.shape == (gemm["spec"]["static_dims"]["N"], x.shape[1])
        # the recorded output is model.onnx's for that layer: the kernel's per-token result is close to it
        q, s = reference.ref_quantize_per_token(x, None, 0.0)
        ours = reference.ref_gemm_w8a8(q, w, s, ws, bias, "bias")
        assert reference.sqnr_db(ours, recorded_out) > 25


@needs_nvcc
def test_a_shape_the_gemm_cannot_serve_keeps_its_qdq_form(tmp_path):
    """K = 24 is no multiple of 16: that MatMul stays Q/DQ in model.kernels.onnx, with the reason;
    the other is served, and its kernels are built with nvcc into OUT/kernels/."""
    rng = np.random.default_rng(9)
    w1 = (rng.standard_normal((24, 32)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((32, 16)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="narrow"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="wide")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 24)).astype(np.float32))
    result = compile_model(path, target="cuda:sm80", recipe="w8a8", calib=tmp_path / "calib.npz",
                           output_dir=tmp_path / "o", progress=False, verify_samples=8)
    section = result.sections["cuda_kernels"]
    assert section["build"]["built"] is True and section["build"]["architectures"] == ["sm_80"]
    folder = tmp_path / "o" / "kernels"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["library"] == CUDA_LIBRARY and not (folder / "BUILD.txt").exists()
    symbols = {f"{k['spec']['op']}_{k['id']}" for k in manifest["kernels"]}
    assert len(symbols) == 2 and symbols | {"RegisterCustomOps"} <= _exported(folder / CUDA_LIBRARY)
    assert all(all(k in (folder / "qcompile_graph_specs.h").read_text() for k in entry["kernels"])
               for entry in manifest["graph_ops"].values())
    assert "narrow" in result.sections["cuda_kernels"]["not_served"]
    assert "K=24" in result.sections["cuda_kernels"]["not_served"]["narrow"]
    twin = ir.load(tmp_path / "o" / KERNELS_MODEL)
    ops = {n.name: n.op_type for n in twin.graph}
    assert ops["narrow"] == "MatMul" and ops["wide"] == "QMatMulPerToken"
    # model.onnx shifts the one-sided ReLU output for its static symmetric scale (shifts.py); the
    # per-token kernel reads the ReLU output itself and the compensation Add is gone
    assert result.report["quantize"]["shifted_one_sided_activations"] == ["r"]
    wide = next(n for n in twin.graph if n.name == "wide")
    assert wide.inputs[0].producer().op_type == "Relu"
    assert not any(n.op_type == "Add" for n in twin.graph)
    assert any("keep the Q/DQ form" in w for w in result.warnings)


def test_nvcc_failing_leaves_the_sources_and_the_command(bert, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDACXX", "/nonexistent/nvcc")
    result = _compile(bert, tmp_path / "out", settings=())
    build_info = result.sections["cuda_kernels"]["build"]
    assert build_info["built"] is False and "no CUDA compiler" in build_info["reason"]
    folder = tmp_path / "out" / "kernels"
    assert not (folder / CUDA_LIBRARY).exists() and any(folder.glob("QGemmW8A8_*.cu"))
    text = (folder / "BUILD.txt").read_text()
    assert "no CUDA compiler" in text and "cmake -S . -B build" in text and "-c QGemmW8A8_" in text
    assert any("cuda kernels: not built" in w for w in result.warnings)
    assert (tmp_path / "out" / KERNELS_MODEL).is_file()       # the graph and its verification do not need nvcc


def test_the_harness_says_why_it_cannot_run_here(tmp_path):
    """No GPU (or no PyTorch): exit 2 and one line, before anything is allocated."""
    (tmp_path / "manifest.json").write_text(json.dumps({"kernels": []}))
    done = subprocess.run([sys.executable, str(TEMPLATES / "check.py"), "--manifest", str(tmp_path / "manifest.json"),
                           "--library", str(tmp_path / CUDA_LIBRARY), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "cannot run" in done.stderr and "Traceback" not in done.stderr


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@needs_nvcc
@pytest.mark.skipif(not _gpu_present(), reason="no CUDA device (the kernels are compiled, not run, here)")
def test_every_kernel_matches_its_reference_on_the_gpu(tmp_path):
    """On a GPU: build the grid for this device and run check.py over it."""
    import torch
    major, minor = torch.cuda.get_device_capability()
    variant = "sm90" if major == 9 else "sm89" if (major, minor) == (8, 9) else "sm80"
    specs = grid(variant)
    sources = render_sources(TEMPLATES, specs, "test", unit="cu", library_templates=LIBRARY_TEMPLATES)
    library = build_cuda(sources, ARCHITECTURES[variant], (find_cutlass().include_dir, find_headers().include_dir))
    kernels = [{"id": s.id, "spec": s.to_dict()} for s in specs]
    rows, _ = check.run_checks(library.path, kernels, None, iters=3)
    bad = [r for r in rows if r["match"] is False]
    assert rows and not bad, bad
