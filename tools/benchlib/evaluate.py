"""Scoring a model against fp32 on held-out data: onnxruntime sessions, running a model sample
by sample, the output metrics (qcompile.verify's ErrorStats: SQNR over all samples, the mean
per-sample cosine, max-abs — the numbers `qcompile verify` reports) and the task metric each
model is judged by (detection IoU, class agreement, embedding cosine)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

ORT_LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL")
METRIC_LABEL = {"det_iou": "det IoU@0.3", "class_agreement": "class agree", "box_f1": "box F1 / px err",
                "ctc_agreement": "text same / CER", "embedding_cosine": "emb. cosine mean / min"}


def parse_shape(spec) -> dict[str, list[int]]:
    """``"x:1,3,640,640 y:1,4"`` / ``{"x": (1,3,640,640)}`` -> ``{"x": [1,3,640,640]}``."""
    if isinstance(spec, dict):
        return {k: [int(d) for d in v] for k, v in spec.items()}
    out = {}
    for part in str(spec).replace(";", " ").split():
        name, _, dims = part.rpartition(":")
        if not name:
            raise ValueError(f"bad input shape {part!r}; expected NAME:D0,D1,...")
        out[name] = [int(d) for d in dims.split(",")]
    return out

def shape_arg(shapes: dict[str, list[int]]) -> str:
    return " ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items())


def session(model_path, threads: int = 2, level: str = "ORT_ENABLE_ALL", spin: bool = True):
    """CPU session; ``level`` names a GraphOptimizationLevel member (the benchmark always uses
    ORT_ENABLE_ALL, except for a peer model that only loads at a lower level -- it says so);
    ``spin=False`` lets the intra-op threads sleep between runs (several sessions in one process)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    library = generated_library(model_path)
    if library is not None:       # a compile's generated kernels (OUT/kernels/), as a user registers them
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def generated_library(model_path):
    """The generated-kernel library a compiled model names in its metadata (None for other models)."""
    import onnx
    from qcompile.backends.cpu.generated_kernels import library_beside
    proto = onnx.load(str(model_path), load_external_data=False)
    return library_beside(model_path, {p.key: p.value for p in proto.metadata_props})


def load_inputs(npz, input_names=None, limit: int | None = None) -> dict[str, np.ndarray]:
    """npz -> {input_name: array}; positional mapping if keys differ from names."""
    with np.load(npz) as z:
        keys = list(z.files)
        arrays = {k: z[k][:limit] if limit else z[k] for k in keys}
    if input_names is None or set(input_names) <= set(keys):
        return {n: arrays[n] for n in (input_names or keys)}
    if len(input_names) != len(keys):
        raise ValueError(f"npz keys {keys} do not match model inputs {input_names}")
    return dict(zip(input_names, arrays.values()))

def run_model(model_path, inputs, *, limit: int | None = None, threads: int = 2,
              level: str = "ORT_ENABLE_ALL") -> dict[str, np.ndarray]:
    """Run a model sample by sample (batch 1: quantized models have a fixed batch).

    ``inputs``: npz path or {name: array}.  Returns {output_name: stacked array}.
    """
    sess = session(model_path, threads, level)
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(inputs, names, limit)
    else:
        feeds = {k: (v[:limit] if limit else v) for k, v in inputs.items()}
        if not set(names) <= set(feeds):
            feeds = dict(zip(names, feeds.values()))
    n = len(next(iter(feeds.values())))
    outs = [o.name for o in sess.get_outputs()]
    res: dict[str, list] = {o: [] for o in outs}
    for i in range(n):
        for o, y in zip(outs, sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})):
            res[o].append(y)
    return {o: np.concatenate(v) for o, v in res.items()}


def compare(outputs: dict, reference: dict) -> dict[str, dict[str, float]]:
    """Per output: SQNR dB over all samples, the mean and min per-sample cosine, max-abs error
    (qcompile.verify.ErrorStats). Outputs are matched by name, falling back to position."""
    from qcompile.verify import ErrorStats

    if not set(reference) <= set(outputs):
        outputs = dict(zip(reference, outputs.values()))
    res = {}
    for name, ref in reference.items():
        got = np.asarray(outputs[name])
        if np.shape(ref) != got.shape:
            raise ValueError(f"output {name!r}: shape {got.shape} vs ref {np.shape(ref)}")
        stats = ErrorStats()
        stats.update(ref, got)
        res[name] = dict(sqnr_db=stats.sqnr_db, cosine=stats.cosine_mean, cosine_min=stats.cosine_min,
                         max_abs=stats.max_abs)
    return res


def task_metric(metric: str, ref0, out0, eval_inputs) -> tuple[float, float | None]:
    """(the model's task metric, its minimum where it has one) on the first output."""
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    if metric == "det_iou":
        import ppocr_data
        return ppocr_data.det_iou(ref0, out0), None
    if metric == "box_f1":          # decoded + NMS boxes matched to fp32's: (F1, edge error in pixels)
        import ddddocr_data
        return ddddocr_data.box_agreement(ref0, out0)
    if metric == "ctc_agreement":   # greedy CTC decodings: (share identical, character error rate)
        import ppocr_data
        return ppocr_data.ctc_agreement(ref0, out0)
    if metric == "class_agreement":
        a, b = np.asarray(ref0), np.asarray(out0)
        return float((a.argmax(-1) == b.argmax(-1)).mean()), None
    import minilm_data
    return minilm_data.embedding_cosine(ref0, out0, eval_inputs["attention_mask"])


def loadable_level(path, threads: int) -> tuple[str | None, list[str]]:
    """The highest graph optimization level at which onnxruntime CPU loads ``path`` (peers only:
    a qcompile output that does not load at ORT_ENABLE_ALL is a qcompile failure), and the errors
    of the levels above it.  onnxruntime's own FP8 QDQ model is the case: at ENABLE_EXTENDED and
    above the QDQ fusion builds a QLinearMatMul/QLinearConv with float8 inputs, which no kernel takes."""
    tried = []
    for level in ORT_LEVELS:
        try:
            session(path, threads, level)
            return level, tried
        except Exception as exc:
            tried.append(f"{level}: {type(exc).__name__}: {exc}"[:500])
    return None, tried


def score(row: dict, metric: str, path, eval_inputs: dict, ref: dict, threads: int,
          outs: dict | None = None, level: str = "ORT_ENABLE_ALL") -> None:
    """Accuracy columns of a row, in place; failures go to row['eval_error']."""
    try:
        if outs is None:
            outs = run_model(path, eval_inputs, threads=threads, level=level)
        per_out = compare(outs, ref)
        first = next(iter(per_out.values()))
        tm, tm_min = task_metric(metric, next(iter(ref.values())), next(iter(outs.values())), eval_inputs)
        row.update(metrics=per_out, sqnr_db=first["sqnr_db"], cosine=first["cosine"],
                   max_abs=first["max_abs"], task_metric=tm, task_metric_min=tm_min)
    except Exception as exc:
        row["eval_error"] = f"{type(exc).__name__}: {exc}"[:600]


def score_sets(row: dict, metric: str, path, sets: dict, threads: int, level: str = "ORT_ENABLE_ALL") -> None:
    """SQNR and task metric of a row on each further data set ({label: (inputs, fp32 outputs)}),
    into row['sets'][label]; a failure goes to row['eval_error'] with the set named."""
    out = row.setdefault("sets", {})
    for label, (inputs, ref) in sets.items():
        part: dict = {}
        score(part, metric, path, inputs, ref, threads, level=level)
        if part.get("eval_error"):
            row["eval_error"] = f"[{label}] {part['eval_error']}"
            continue
        out[label] = {k: part[k] for k in ("sqnr_db", "cosine", "task_metric")}


def random_feeds(sess, shape, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    inputs = sess.get_inputs()
    if isinstance(shape, (tuple, list)):
        shape = {inputs[0].name: list(shape)}
    shapes = parse_shape(shape)
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
    feeds = {}
    for i in inputs:
        dims = [batch, *shapes[i.name][1:]] if i.name in shapes else \
            [batch, *[d if isinstance(d, int) else 1 for d in i.shape[1:]]]
        dt = types.get(i.type, np.float32)
        feeds[i.name] = (rng.standard_normal(dims) if np.issubdtype(dt, np.floating)
                         else rng.integers(0, 2, dims)).astype(dt)
    return feeds
