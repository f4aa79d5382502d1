"""The `fuse` pass: onnxscript's fusion rules on BERT- and Llama-style builder graphs, in the
TorchScript spelling, before and after quantization, with its report and explanations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import bert_block, llama_block  # noqa: E402
from qcompile.passes.rules import spelling  # noqa: E402

FUSE = """apiversion: qcompile/v1
metadata: {name: fuse-only}
spec:
  passes:
    - type: canonicalize
    - type: fuse
"""
QUANT_THEN_FUSE = """apiversion: qcompile/v1
metadata: {name: w8a8-then-fuse}
spec:
  passes:
    - type: canonicalize
    - type: calibrate
    - type: quantize
      speed_fallback: false
    - type: fuse
"""


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_block.write(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_block.write(tmp_path_factory.mktemp("llama"))


def _compile(run_cli, tmp_path, files, recipe_text, name, target="cpu", model=None, calib=True, extra=()):
    """Compile and verify on files["eval"]; a decoder keeps its dynamic input shapes on cpu (with
    or without calibration data), so it can still decode, unless `extra` pins them."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / name
    res = run_cli([model or files["model"], "--target", target, "--recipe", recipe,
                   *(["--calib", files["calib"]] if calib else []),
                   "--verify-data", files["eval"], "-o", out, "-q", *extra])
    assert res.code == 0, res.err
    return json.loads((out / "report.json").read_text()), out / "model.onnx"


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _relative_error(files, compiled) -> float:
    data = dict(np.load(files["eval"]))
    ref_sess = ort.InferenceSession(str(files["model"]), providers=["CPUExecutionProvider"])
    got_sess = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i in range(4):  # the compiled model's batch is pinned to 1
        feed = {k: v[i:i + 1] for k, v in data.items()}
        ref, got = ref_sess.run(None, feed)[0], got_sess.run(None, feed)[0]
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def test_bert_block_fuses_attention_norm_and_gelu_and_keeps_outputs(run_cli, tmp_path, bert):
    report, model = _compile(run_cli, tmp_path, bert, FUSE, "bert")
    ops = _ops(model)
    assert ops.get("MultiHeadAttention") == 2          # both layers' attention
    # embeddings sum + LayerNorm, and two residual Add + LayerNorm per layer
    assert ops.get("SkipLayerNormalization") == 5 and ops.get("BiasGelu") == 2
    assert "Softmax" not in ops and "Erf" not in ops
    assert report["fuse"]["rules"]["bias_last"] > 0    # the TorchScript bias-first spelling was rewritten
    assert report["fuse"]["unfused_attention"] == []
    assert _relative_error(bert, model) <= 1e-5


def test_a_batch_pinned_above_one_keeps_the_full_tensor_as_skip_norm_input(run_cli, tmp_path, bert):
    """The embedding sum's position term folds to a [1, seq, hidden] constant once the batch is
    pinned; as SkipLayerNormalization's `input` it would size the output at batch 1 (onnxruntime
    then refuses the attention bias). Pinned at 16, the fused graph runs and equals the original."""
    report, model = _compile(run_cli, tmp_path, bert, FUSE, "b16",
                             extra=("--input-shape", "input_ids:16,16", "--input-shape", "attention_mask:16,16"))
    assert report["fuse"]["rules"]["skip_norm_full_input_first"] == 1
    assert _ops(model).get("SkipLayerNormalization") == 5
    feed = {k: v[:16] for k, v in np.load(bert["eval"]).items()}
    ref = ort.InferenceSession(str(bert["model"]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert got.shape == (16, 16, 64)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _decodes_like(original, compiled, steps: int = 6) -> float:
    """Largest relative difference of the next-token logits over a multi-step greedy decode
    (prefill, then one-token steps feeding present back as past)."""
    prompts = np.random.default_rng(3).integers(1, 512, size=(3, 9))
    ref = llama_block.decode(str(original), prompts, steps)
    got = llama_block.decode(str(compiled), prompts, steps, forced_ids=ref.argmax(-1)[:, :steps - 1])
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _assert_fused_llama_exact(report: dict, model, original) -> None:
    """Attention, rotary and RMSNorms fused; outputs and a multi-step decode as the original's."""
    ops = _ops(model)
    assert ops.get("MultiHeadAttention") == 2
    assert ops.get("RotaryEmbedding") == 4                 # Q and K in each of the 2 layers
    assert ops.get("SimplifiedLayerNormalization", 0) + ops.get("SkipSimplifiedLayerNormalization", 0) == 5
    assert "Softmax" not in ops and "Neg" not in ops         # attention and rotate_half are gone
    for out, stats in report["verification"]["outputs"].items():
        assert float(stats["sqnr_db"]) > 100, out            # "inf" where bit-identical
    assert _decodes_like(original, model) <= 1e-5


def test_llama_block_fuses_rmsnorm_rotary_and_attention_with_past(run_cli, tmp_path, llama):
    report, model = _compile(run_cli, tmp_path, llama, FUSE, "llama", calib=False)
    _assert_fused_llama_exact(report, model, llama["model"])
    rules = report["fuse"]["rules"]
    assert rules["explicit_defaults"] > 0 and rules["positive_slice_axes"] > 0
    assert rules["gathered_cos_sin"] == 4                   # cos/sin Gathered from cached tables


def test_llama_fusion_after_quantization_fuses_the_same_subgraphs(run_cli, tmp_path, llama):
    plain, _ = _compile(run_cli, tmp_path, llama, FUSE, "plain")
    report, model = _compile(run_cli, tmp_path, llama, QUANT_THEN_FUSE, "qfuse")
    assert report["fuse"]["fused_ops"] == plain["fuse"]["fused_ops"]
    assert report["fuse"]["qdq"]["lifted"] > 0
    projections = [n for n in report["layers"] if n.endswith(("q_proj/MatMul", "k_proj/MatMul", "v_proj/MatMul"))]
    assert len(projections) == 6 and all(report["layers"][n]["status"] == "quantized" for n in projections)


def test_group_query_attention_is_opt_in_and_exact_where_the_mask_keeps(run_cli, tmp_path, llama):
    """onnxscript's GQA rule takes the causal mask only in the form a graph pinned to a prefill
    (past length 0) folds to: with the shapes pinned it fires; the dynamic decoder keeps MHA."""
    recipe = FUSE.replace("- type: fuse", "- type: fuse\n      rules: [rms_norm, skip_norm, rotary, attention, "
                                          "attention_gqa]")
    shapes = ["input_ids:1,16", "attention_mask:1,16", "position_ids:1,16",
              *[f"past_key_values.{i}.{k}:1,2,0,16" for i in range(2) for k in ("key", "value")]]
    pinned = [arg for shape in shapes for arg in ("--input-shape", shape)]
    dynamic, _ = _compile(run_cli, tmp_path, llama, recipe, "gqa-dynamic")
    assert "com.microsoft::GroupQueryAttention" not in dynamic["fuse"]["fused_ops"]
    report, model = _compile(run_cli, tmp_path, llama, recipe, "gqa", extra=pinned)
    assert report["fuse"]["fused_ops"].get("com.microsoft::GroupQueryAttention") == 2
    data = dict(np.load(llama["eval"]))
    ref_sess = ort.InferenceSession(str(llama["model"]), providers=["CPUExecutionProvider"])
    got_sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for i in range(6):
        feed = {k: v[i:i + 1] for k, v in data.items()}
        ref, got = ref_sess.run(None, feed)[0][0], got_sess.run(None, feed)[0][0]
        kept = feed["attention_mask"][0] == 1               # right-padded positions are not computed
        assert np.abs(got[kept] - ref[kept]).max() <= 1e-5 * np.abs(ref).max()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random-weight Hugging Face Llama exported with its KV cache, both exporters."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from models.export_hf import export_causal_lm, random_llama
    work = tmp_path_factory.mktemp("hf_llama")
    ckpt = random_llama(work / "ckpt")
    files = {"eval": work / "eval.npz",
             "torchscript": export_causal_lm(ckpt, work / "ts.onnx"),
             "dynamo": export_causal_lm(ckpt, work / "dynamo.onnx", dynamo=True)}
    np.savez(files["eval"], **llama_block.sample_inputs(8, 4))
    return files


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_hf_llama_export_fuses_in_both_spellings(run_cli, tmp_path, hf_llama, exporter):
    files = {"model": hf_llama[exporter], "eval": hf_llama["eval"]}
    report, model = _compile(run_cli, tmp_path, files, FUSE, exporter, calib=False)
    _assert_fused_llama_exact(report, model, files["model"])
    rules = report["fuse"]["rules"]
    assert rules["outer_product_cos_sin"] == 4              # cos/sin from position_ids * inv_freq
    if exporter == "torchscript":                           # rsqrt as Div(1, .); the split point computed
        assert rules["reciprocal"] == 5 and rules["static_dims"] > 0


def test_fusion_after_quantization_fuses_the_same_subgraphs(run_cli, tmp_path, bert):
    plain, _ = _compile(run_cli, tmp_path, bert, FUSE, "plain")
    report, model = _compile(run_cli, tmp_path, bert, QUANT_THEN_FUSE, "qfuse")
    assert report["fuse"]["fused_ops"] == plain["fuse"]["fused_ops"]
    qdq = report["fuse"]["qdq"]
    assert qdq["lifted"] > 0
    # the Q/DQ inside attention (on Q, K^T, V and the softmax) is gone; the projections' stay
    assert qdq["dropped_inside_fused_ops"] and all("attention/self" in t for t in qdq["dropped_inside_fused_ops"])
    # the query/key/value projections kept their Q/DQ (restored) and reached an int8 kernel
    qkv = [name for name in report["layers"] if name.endswith(("query/MatMul", "key/MatMul", "value/MatMul"))]
    assert len(qkv) == 6 and all(report["layers"][n]["status"] == "quantized" for n in qkv)
    assert all(report["layers"][n].get("kernel") == "MatMulIntegerToFloat" for n in qkv)
    swallowed = [name for name, rec in report["layers"].items() if "attention/self/MatMul" in name]
    assert swallowed and all(report["layers"][n]["status"] == "float" for n in swallowed)


def test_broken_attention_is_left_unfused_and_explained(run_cli, tmp_path, bert):
    m = onnx.load(str(bert["model"]))
    softmax = next(n for n in m.graph.node if n.op_type == "Softmax")
    next(a for a in softmax.attribute if a.name == "axis").i = 1
    broken = tmp_path / "broken.onnx"
    onnx.save(m, str(broken))
    report, model = _compile(run_cli, tmp_path, bert, FUSE, "broken", model=broken)
    assert _ops(model).get("MultiHeadAttention") == 1   # the intact layer still fuses
    (entry,) = report["fuse"]["unfused_attention"]
    assert entry["softmax"] == softmax.name
    assert "axis" in entry["why"] and softmax.name in entry["at"]
    assert any("left unfused" in w for w in report["warnings"])


def test_ascend_runs_no_contrib_fusions(run_cli, tmp_path, small_cnn_files):
    report, model = _compile(run_cli, tmp_path, small_cnn_files, FUSE, "ascend", target="ascend310b")
    assert report["fuse"]["groups"] == []
    assert "attention" in report["fuse"]["not_run"] and "does not run" in report["fuse"]["not_run"]["attention"]


def test_fuse_on_ascend_keeps_the_opset_atc_parses(run_cli, tmp_path, bert):
    # fuse alone would raise the opset to 18; Ascend runs no fusion group and parses <= 16
    report, model = _compile(run_cli, tmp_path, bert, QUANT_THEN_FUSE, "ascend_bert", target="ascend910b")
    assert report["fuse"]["groups"] == [] and onnx.load(str(model)).opset_import[0].version <= 16


def test_fa3_on_a_target_without_attention_fusion_is_refused_before_any_work(run_cli, tmp_path, bert):
    res = run_cli([bert["model"], "--target", "ascend910b", "--recipe", "w8a8-fa3", "--calib", bert["calib"],
                   "-o", tmp_path / "o"])
    assert res.code == 6 and "fused attention" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "o").exists()


def test_unknown_fusion_group_is_a_recipe_error(run_cli, tmp_path, bert):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(FUSE.replace("- type: fuse", "- type: fuse\n      rules: [attention, flash]"))
    res = run_cli([bert["model"], "--recipe", recipe, "--calib", bert["calib"], "-o", tmp_path / "o"])
    assert res.code != 0 and "flash" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "o").exists()


# -- the spelling rules and the Q/DQ lift on hand-made graphs -----------------------------------
def _graph(nodes, inputs, outputs, inits=()):
    g = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _vi(name, shape, dtype=onnx.TensorProto.FLOAT):
    return onnx.helper.make_tensor_value_info(name, dtype, shape)


def _c(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def test_reshape_copy_dims_replaces_shape_arithmetic_with_zeros():
    h = onnx.helper
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             h.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             h.make_node("Unsqueeze", ["d0", "ax"], ["u0"]), h.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             h.make_node("Concat", ["u0", "u1", "m1", "hd"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [_c("i0", np.int64(0)), _c("i1", np.int64(1)), _c("ax", [0]), _c("m1", [-1]), _c("hd", [8])]
    model = _graph(nodes, [_vi("x", ["b", "s", 32])], [_vi("y", None)], inits)
    assert spelling.reshape_copy_dims(model.graph) == 1
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, -1, 8]
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    got = ort.InferenceSession(_bytes(model)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x.reshape(2, 3, 4, 8))


def test_reshape_copy_dims_leaves_a_different_dimension_alone():
    h = onnx.helper
    nodes = [h.make_node("Shape", ["z"], ["s"]), h.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             h.make_node("Unsqueeze", ["d0", "ax"], ["u0"]),
             h.make_node("Concat", ["u0", "m1"], ["shape"], axis=0), h.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [_c("i0", np.int64(0)), _c("ax", [0]), _c("m1", [-1])]
    model = _graph(nodes, [_vi("x", ["b", 32]), _vi("z", ["other", 4])], [_vi("y", None)], inits)
    assert spelling.reshape_copy_dims(model.graph) == 0


def test_bias_last_positive_axes_and_explicit_defaults_keep_results():
    h = onnx.helper
    nodes = [h.make_node("Add", ["bias", "x"], ["a"]),
             h.make_node("Slice", ["a", "st", "en", "axes"], ["sl"]),
             h.make_node("ReduceMean", ["sl", "axes"], ["y"], keepdims=1)]
    inits = [_c("bias", np.arange(8, dtype=np.float32)), _c("st", [1]), _c("en", [5]), _c("axes", [-1])]
    model = _graph(nodes, [_vi("x", [2, 8])], [_vi("y", [2, 1])], inits)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    before = ort.InferenceSession(_bytes(model)).run(None, {"x": x})[0]
    assert spelling.bias_last(model.graph) == 1
    assert spelling.positive_slice_axes(model.graph) == 1
    assert spelling.explicit_defaults(model.graph) == 2   # ReduceMean attribute, Slice steps
    add = next(n for n in model.graph if n.op_type == "Add")
    assert add.inputs[1].const_value is not None
    sl = next(n for n in model.graph if n.op_type == "Slice")
    assert sl.inputs[3].const_value.numpy().tolist() == [1] and sl.inputs[4].const_value.numpy().tolist() == [1]
    after = ort.InferenceSession(_bytes(model)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, (x + np.arange(8))[:, 1:5].mean(-1, keepdims=True), rtol=1e-6)


def test_reciprocal_and_static_dims_keep_results():
    h = onnx.helper
    nodes = [h.make_node("Sqrt", ["x"], ["r"]), h.make_node("Div", ["one", "r"], ["inv"]),
             h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "last"], ["d"], axis=0),
             h.make_node("Div", ["d", "two"], ["half"]), h.make_node("Unsqueeze", ["half", "ax"], ["split"]),
             h.make_node("Slice", ["inv", "zero", "split", "ax_last"], ["y"])]
    inits = [_c("one", np.float32(1.0)), _c("last", np.int64(2)), _c("two", np.int64(2)), _c("ax", [0]),
             _c("zero", [0]), _c("ax_last", [2])]
    model = _graph(nodes, [_vi("x", ["b", "s", 8])], [_vi("y", None)], inits)
    x = np.random.default_rng(2).uniform(0.5, 4.0, (2, 3, 8)).astype(np.float32)
    before = ort.InferenceSession(_bytes(model)).run(None, {"x": x})[0]
    assert spelling.reciprocal(model.graph) == 1
    assert spelling.static_dims(model.graph) == 1            # Shape(x)[2] is 8; Shape(x)[0] would not be
    assert [n.op_type for n in model.graph].count("Reciprocal") == 1
    after = ort.InferenceSession(_bytes(model)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, (1 / np.sqrt(x))[..., :4], rtol=1e-6)


def test_reciprocal_leaves_other_numerators_alone():
    h = onnx.helper
    model = _graph([h.make_node("Div", ["two", "x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])],
                   [_c("two", np.float32(2.0))])
    assert spelling.reciprocal(model.graph) == 0


def _bytes(model) -> bytes:
    proto = ir.to_proto(model)
    proto.ir_version = 8
    return proto.SerializeToString()


def test_repeated_shape_arithmetic_is_merged_and_the_decoder_still_decodes_alike(run_cli, tmp_path, hf_llama):
    """Every layer of a Hugging Face export recomputes the same shapes (repeat_kv's Expand);
    after fusion one copy is left (fewer nodes than with share_shapes off) and prefill and
    multi-step decode stay exact."""
    files = {"model": hf_llama["torchscript"], "eval": hf_llama["eval"]}
    off = FUSE.replace("- type: fuse", "- type: fuse\n      share_shapes: false")
    _, plain_model = _compile(run_cli, tmp_path, files, off, "unshared", calib=False)
    report, model = _compile(run_cli, tmp_path, files, FUSE, "shared", calib=False)
    merged = report["fuse"]["shape_arithmetic"]
    assert merged["shared_shapes"] > 0 and merged["nodes_removed"] > 0
    assert sum(_ops(model).values()) == sum(_ops(plain_model).values()) - merged["nodes_removed"]
    _assert_fused_llama_exact(report, model, files["model"])
