"""The models the model bench measures and the data it uses: PP-OCR det/cls from their PyPI
wheel (rendered text pages), all-MiniLM-L6-v2 exported once from its wheel (sentences), and
the seeded builders (small_cnn, bert_block)."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .exports import cached_export

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = ("ppocr_det", "ppocr_cls", "ppocr_rec", "ddddocr_det", "minilm", "small_cnn", "bert_block")
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


# ---------------------------------------------------------------------- models
@dataclass
class ModelSetup:
    name: str
    model: Path                     # fp32 ONNX (as shipped / exported / built)
    calib: Path
    eval: Path
    shapes: dict                    # batch-1 input shapes
    family: str                     # cnn | transformer
    metric: str                     # det_iou | class_agreement | ctc_agreement | box_f1 | embedding_cosine
    notes: list = field(default_factory=list)
    # more sets every row is also scored on, beside `eval`: the calibration set itself and, where
    # the model has one, a differently rendered set no choice was made on ({label: npz})
    more_sets: dict = field(default_factory=dict)


def npz_len(path) -> int:
    with np.load(path) as z:
        return len(z[z.files[0]])


def export_minilm(checkpoint: Path, python: str, timeout: float = 1800) -> Path:
    """The MiniLM checkpoint exported once to ``$QCOMPILE_CACHE/models/minilm/export/minilm.onnx``."""
    from models import zoo
    want = {"checkpoint_sha256": zoo.get("minilm").sha256, "exporter": "models/export_hf.py", "opset": 17,
            "dynamo": False}
    return cached_export("minilm", checkpoint, want, python, args=("--opset", "17"), timeout=timeout)


def _builder(name: str):
    """A seeded builder, imported as ``models.<name>`` (they import ``models.graph_builder``)."""
    return importlib.import_module(f"models.{name}")


def _shapes_from(npz) -> dict:
    """Batch-1 input shapes of a builder's calibration set (the builders own their sizes)."""
    with np.load(npz) as z:
        return {k: [1, *z[k].shape[1:]] for k in z.files}


def setup_model(name: str, work: Path, args) -> ModelSetup:
    work.mkdir(parents=True, exist_ok=True)
    if name == "small_cnn":
        p = _builder("small_cnn").write(work / "src")
        return ModelSetup(name, p["model"], p["calib"], p["eval"], _shapes_from(p["calib"]), "cnn",
                          "class_agreement", ["seeded builder models/small_cnn.py (random weights)"])
    if name == "bert_block":
        p = _builder("bert_block").write(work / "src")
        return ModelSetup(name, p["model"], p["calib"], p["eval"], _shapes_from(p["calib"]), "transformer",
                          "embedding_cosine", ["seeded builder models/bert_block.py (2 layers, hidden 64, "
                                               "random weights, -3.4e38 additive mask)"])
    from models import zoo
    if name in ("ppocr_det", "ppocr_cls", "ppocr_rec"):
        import ppocr_data
        model = zoo.fetch(name)
        sets = ppocr_data.make_sets(name, args.data_dir)
        entry = zoo.get(name)
        return ModelSetup(name, model, sets["calib"], sets["eval"],
                          {k: list(v) for k, v in entry.input_shape.items()}, "cnn",
                          {"ppocr_det": "det_iou", "ppocr_cls": "class_agreement", "ppocr_rec": "ctc_agreement"}[name],
                          [f"{entry.package}=={entry.version} {entry.filename}; rendered-text data "
                           f"(tools/ppocr_data.py): calib and eval pages in one style, disjoint words and "
                           f"seeds; *other* = scenes rendered differently (other fonts, textured/dark "
                           f"backgrounds, JPEG, uneven light) that no choice was made on"],
                          more_sets={"calib": sets["calib"], "other": sets["other"]})
    if name == "ddddocr_det":
        import ddddocr_data
        model = zoo.fetch(name)
        sets = ddddocr_data.make_sets(args.data_dir)
        entry = zoo.get(name)
        return ModelSetup(name, model, sets["calib"], sets["eval"],
                          {k: list(v) for k, v in entry.input_shape.items()}, "cnn", "box_f1",
                          [f"{entry.package}=={entry.version} {entry.filename} (YOLOX, boxes and scores "
                           f"concatenated per anchor); rendered click-captcha pictures (tools/ddddocr_data.py): "
                           f"calib and eval in one style; *other* = other fonts, dark/busy grounds, wide "
                           f"pictures, JPEG, that no choice was made on. Task metric: boxes decoded and NMS'd "
                           f"as ddddocr does, matched to fp32's at IoU 0.5: mean F1 / mean edge error (px)"],
                          more_sets={"calib": sets["calib"], "other": sets["other"]})
    if name == "minilm":
        import minilm_data
        ckpt = zoo.fetch("minilm")
        model = export_minilm(ckpt, args.python)
        sets = minilm_data.make_sets(ckpt, Path(args.data_dir), n_calib=64, n_eval=200, seq=64)
        entry = zoo.get("minilm")
        return ModelSetup(name, model, sets["calib"], sets["eval"],
                          {k: list(v) for k, v in entry.input_shape.items()}, "transformer",
                          "embedding_cosine", ["all-MiniLM-L6-v2 exported by models/export_hf.py (opset 17, "
                                               "TorchScript); sentences from tools/minilm_data.py, seq 64"])
    raise KeyError(f"unknown model {name!r}; known: {', '.join(DEFAULT_MODELS)}")


def has_const_matmul(model_path) -> bool:
    """Whether MatMulNBits has anything to do: a MatMul whose B is a 2-D initializer."""
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: len(t.dims) for t in m.graph.initializer}
    return any(n.op_type == "MatMul" and len(n.input) > 1 and inits.get(n.input[1]) == 2 for n in m.graph.node)
