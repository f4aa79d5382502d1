"""kv_cache: an int8 KV cache on the Llama-style builder, checked against a numpy
quantization of the float model's present tensors and over multi-step decoding; and
quantize_attention (FA3) scales against numpy per-head maxima."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from decode_compare import compare_decode  # noqa: E402
from models import bert_block, llama_block  # noqa: E402

KV_ONLY = """apiversion: qcompile/v1
metadata: {{name: kv-only}}
spec:
  passes:
    - type: canonicalize
    - type: kv_cache
      granularity: {granularity}
"""
FA3 = """apiversion: qcompile/v1
metadata: {name: fa3-only}
spec:
  passes:
    - type: canonicalize
    - type: fuse
    - type: calibrate
    - type: quantize_attention
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_block.write(tmp_path_factory.mktemp("llama"))


def _compile(run_cli, tmp_path, files, recipe_text, name, extra=()):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / name
    res = run_cli([files["model"], "--target", "cpu", "--recipe", recipe, "--calib", files["calib"],
                   "--verify-data", files["eval"], "-o", out, "-q", *extra])
    return res, out


def _float_presents(files, n=32) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(files["model"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs() if o.name.startswith("present")]
    data = dict(np.load(files["calib"]))
    outs = [sess.run(names, {k: v[i:i + 1] for k, v in data.items()}) for i in range(n)]
    return {name: np.concatenate([o[j] for o in outs]) for j, name in enumerate(names)}


@pytest.mark.parametrize("granularity", ["per_head", "per_channel"])
def test_kv_cache_is_int8_with_numpy_scales(run_cli, tmp_path, llama, granularity):
    res, out = _compile(run_cli, tmp_path, llama, KV_ONLY.format(granularity=granularity), granularity)
    assert res.code == 0, res.err
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past = [i for i in sess.get_inputs() if i.name.startswith("past")]
    present = [o for o in sess.get_outputs() if o.name.startswith("present")]
    assert len(past) == len(present) == 4
    assert all(v.type == "tensor(int8)" for v in past + present)
    assert past[0].shape[2] == "past_sequence"                     # dynamic: decoding still works
    codecs = json.loads({p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
                        ["qcompile.io_quantization"])
    ref = _float_presents(llama)
    for name, x in ref.items():
        keep = (1, 3) if granularity == "per_channel" else (1,)
        absmax = np.abs(x).max(axis=tuple(i for i in range(4) if i not in keep), keepdims=True)
        scale = np.asarray(codecs[name]["scale"], np.float32).reshape(codecs[name]["shape"])
        np.testing.assert_allclose(scale, absmax / 127.0, rtol=1e-6)
        assert codecs[name.replace("present", "past_key_values")] == codecs[name]
    # layer 0's present is computed before any quantized tensor is read: it must be exactly
    # the numpy quantization of the float one
    data = dict(np.load(llama["eval"]))
    feed = {k: v[:1] for k, v in data.items()}
    feed.update({k: v[:1].astype(np.int8) for k, v in data.items() if k.startswith("past")})   # empty
    got = dict(zip([o.name for o in present], sess.run([o.name for o in present], feed)))
    float_sess = ort.InferenceSession(str(llama["model"]), providers=["CPUExecutionProvider"])
    want = float_sess.run(["present.0.key"], {k: v[:1] for k, v in data.items()})[0]
    scale = np.asarray(codecs["present.0.key"]["scale"], np.float32).reshape(codecs["present.0.key"]["shape"])
    q = np.clip(np.rint(want / scale), -128, 127).astype(np.int8)
    assert np.abs(got["present.0.key"].astype(int) - q).max() <= 1
    assert (got["present.0.key"] == q).mean() > 0.999
    report = json.loads((out / "report.json").read_text())
    assert report["kv_cache"]["bytes_per_token"]["int8"] * 4 == report["kv_cache"]["bytes_per_token"]["float32"]


def test_multi_step_decode_tracks_the_float_model(run_cli, tmp_path, llama):
    res, out = _compile(run_cli, tmp_path, llama, KV_ONLY.format(granularity="per_head"), "decode")
    assert res.code == 0, res.err
    result = compare_decode(llama["model"], out / "model.onnx", steps=6, prompts=4)
    assert len(result["steps"]) == 6
    assert all(s["cosine_mean"] > 0.999 for s in result["steps"]), result["steps"]
    assert result["cache_bytes_per_token"]["compiled"] * 4 == result["cache_bytes_per_token"]["float"]


def test_kv_cache_on_an_encoder_is_a_clear_error(run_cli, tmp_path):
    files = bert_block.write(tmp_path / "bert")
    res, out = _compile(run_cli, tmp_path, files, KV_ONLY.format(granularity="per_head"), "enc")
    assert res.code != 0 and "no past/present" in res.err and "Traceback" not in res.err
    assert not out.exists()


def test_mismatched_past_present_pairs_are_named(run_cli, tmp_path, llama):
    m = onnx.load(str(llama["model"]))
    out = next(o for o in m.graph.output if o.name == "present.1.value")
    for node in m.graph.node:
        node.output[:] = ["present.1.v" if o == out.name else o for o in node.output]
    out.name = "present.1.v"
    broken = dict(llama, model=tmp_path / "broken.onnx")
    onnx.save(m, str(broken["model"]))
    res, dest = _compile(run_cli, tmp_path, broken, KV_ONLY.format(granularity="per_head"), "mismatch")
    assert res.code != 0 and "present.1.v" in res.err and "past_key_values.1.value" in res.err
    assert not dest.exists()


def test_fa3_scales_are_per_head_maxima(run_cli, tmp_path):
    files = bert_block.write(tmp_path / "bert")
    res, out = _compile(run_cli, tmp_path, files, FA3, "fa3")
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    nodes = report["quantize_attention"]["nodes"]
    assert len(nodes) == 2 and all(set(v) == {"query", "key", "value"} for v in nodes.values())
    # numpy reference: the float model's layer-0 query projection output, per head of 16 channels
    m = onnx.load(str(files["model"]))
    q_name = next(n.output[0] for n in m.graph.node if n.name == "/encoder/layer.0/attention/self/query/Add")
    m.graph.output.append(onnx.helper.make_tensor_value_info(q_name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    data = dict(np.load(files["calib"]))
    qs = np.concatenate([sess.run([q_name], {k: v[i:i + 1] for k, v in data.items()})[0]
                         for i in range(len(next(iter(data.values()))))])
    heads = 4
    want = np.abs(qs).reshape(*qs.shape[:-1], heads, -1).max(axis=(0, 1, 3)) / 127.0
    first = next(v for k, v in nodes.items())
    np.testing.assert_allclose(first["query"], want, rtol=1e-5)
    out_stats = report["verification"]["outputs"]["last_hidden_state"]
    assert out_stats["sqnr_db"] > 25   # int8 Q/K/V alone keeps the encoder close to float


def test_fa3_qdq_on_the_head_view_equals_numpy_per_head_fake_quant(run_cli, tmp_path):
    """The pass's QDQ form (on cpu generate_kernels replaces it: tests/test_int8_attention.py)."""
    files = bert_block.write(tmp_path / "bert")
    res, out = _compile(run_cli, tmp_path, files, FA3, "fa3", ("--set", "generate_kernels.enabled=false"))
    assert res.code == 0, res.err
    scales = json.loads((out / "report.json").read_text())["quantize_attention"]["nodes"]
    m = onnx.load(str(out / "model.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    mha = next(n for n in m.graph.node if n.op_type == "MultiHeadAttention")
    merge = producer[mha.input[0]]                     # Reshape back to [batch, seq, hidden]
    dq = producer[merge.input[0]]
    q = producer[dq.input[0]]
    split = producer[q.input[0]]                       # Reshape to [batch, seq, heads, head_dim]
    assert [merge.op_type, dq.op_type, q.op_type, split.op_type] == \
        ["Reshape", "DequantizeLinear", "QuantizeLinear", "Reshape"]
    assert next(a.i for a in dq.attribute if a.name == "axis") == 2
    m.graph.output.extend([onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                           for v in (split.input[0], merge.output[0])])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    data = dict(np.load(files["eval"]))
    before, after = sess.run([split.input[0], merge.output[0]], {k: v[:1] for k, v in data.items()})
    scale = np.asarray(scales[mha.name]["query"], np.float32)          # one per head
    heads = before.reshape(*before.shape[:-1], scale.size, -1)
    want = (np.clip(np.round(heads / scale[:, None]), -128, 127) * scale[:, None]).reshape(before.shape)
    np.testing.assert_allclose(after, want, rtol=0, atol=1e-6)


def test_kv8_on_a_graph_without_a_kv_cache_is_refused_before_any_work(run_cli, tmp_path):
    """The KV-cache check runs on the loaded model before the first pass: without --calib the
    SmoothQuant step (which needs data) would otherwise fail first, with another error."""
    from conftest import TinyModels
    path, _ = TinyModels.save(TinyModels(0).mlp(), tmp_path, "m")
    res = run_cli([path, "--recipe", "w8a8-kv8", "-o", tmp_path / "out"])
    assert res.code == 4 and "no past/present key-value tensors" in res.err
    assert not (tmp_path / "out").exists()


def test_a_shape_of_the_past_reads_the_int8_input_not_its_dequantization(run_cli, tmp_path, llama):
    """A mask's past length taken as Shape(past) must not depend on the dequantized cache: a
    kernel that reads the int8 cache directly (QAttentionKVCache) would have to keep widening it."""
    model = onnx.load(str(llama["model"]))
    model.graph.node.append(onnx.helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("past_shape", onnx.TensorProto.INT64, [4]))
    files = {**llama, "model": tmp_path / "with_shape.onnx"}
    onnx.save(model, str(files["model"]))
    res, out = _compile(run_cli, tmp_path, files, KV_ONLY.format(granularity="per_channel"), "shape")
    assert res.code == 0, res.err
    compiled = onnx.load(str(out / "model.onnx"))
    shape = next(n for n in compiled.graph.node if n.output[0] == "past_shape")
    assert list(shape.input) == ["past_key_values.0.key"]
    feed = {k: v[:1] for k, v in dict(np.load(llama["eval"])).items()}
    feed.update({k: np.zeros((1, 2, 5, 16), np.int8) for k in feed if k.startswith("past")})
    feed["attention_mask"] = np.ones((1, 5 + feed["input_ids"].shape[1]), np.int64)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["past_shape"], feed)
    assert got[0].tolist() == [1, 2, 5, 16]
