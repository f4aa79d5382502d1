"""Verification: run the original and the compiled model in onnxruntime on the
same held-out inputs and measure how far the compiled one drifts.

Per output: SQNR (dB, over all samples), cosine (mean and minimum per sample),
max-abs error. For a causal LM (input_ids in, logits out): perplexity of both models over
the same tokens and next-token top-1 agreement (compiler/lm_metrics.py). Per quantized layer: SQNR of its output against the original's
same tensor, and the SQNR of the noise it adds on top of what reached its input
(the error it introduces; lowest first is what fallback returns to float).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .analyses import Rescales
from .calib_data import Dataset
from .lm_metrics import IDS, LOGITS, MASK, TokenStats, is_causal_lm
from .model_io import MAX_IR_VERSION
from .ort_session import session_options
from .progress import progress_bar


class ErrorStats:
    """Streaming error statistics of one tensor against its reference, batch by batch (axis 0:
    samples): SQNR over everything, cosine per sample, max-abs error. The one definition of
    these metrics: the benches take theirs from here too."""

    def __init__(self):
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.cosines: list[float] = []

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            raise ValueError(f"shape mismatch {ref.shape} vs {got.shape}")
        err = ref - got
        finite = np.isfinite(ref) & np.isfinite(got)
        self.signal += float(np.sum(np.square(ref[finite])))
        self.noise += float(np.sum(np.square(err[finite])))
        if finite.any():
            self.max_abs = max(self.max_abs, float(np.max(np.abs(err[finite]))))
        for r, g in zip(ref.reshape(ref.shape[0], -1) if ref.ndim else [ref.ravel()],
                        got.reshape(got.shape[0], -1) if got.ndim else [got.ravel()]):
            nr, ng = np.linalg.norm(r), np.linalg.norm(g)
            self.cosines.append(1.0 if nr == ng == 0 else float(np.dot(r, g) / max(nr * ng, 1e-300)))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return float(10.0 * np.log10(self.signal / self.noise))

    @property
    def cosine_mean(self) -> float:
        return float(np.mean(self.cosines))

    @property
    def cosine_min(self) -> float:
        return float(np.min(self.cosines))

    @property
    def nsr(self) -> float:
        """Noise-to-signal power ratio (linear): additive across layers, unlike dB."""
        return self.noise / self.signal if self.signal > 0 else float("inf")

    def summary(self) -> dict:
        return {"sqnr_db": _round(self.sqnr_db), "cosine_mean": _round(self.cosine_mean, 6),
                "cosine_min": _round(self.cosine_min, 6), "max_abs": _round(self.max_abs, 6)}


def _round(x: float, digits: int = 3):
    return x if not np.isfinite(x) else round(float(x), digits)


def _fixed_batch(session: ort.InferenceSession) -> int:
    """Batch size a model pinned with --input-shape wants (1 when dynamic)."""
    for i in session.get_inputs():
        if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0:
            return i.shape[0]
    return 1


def _tensor_names(model_path: Path) -> set[str]:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {i.name for i in graph.input} | {o for n in graph.node for o in n.output}


def _session(model_path: Path, extra: list[str] = ()) -> ort.InferenceSession:
    """A session over the file; the model is re-serialized only to expose `extra` outputs or to
    lower an IR version newer than onnxruntime reads (a recent onnx writes IR 14, onnxruntime
    1.31 reads up to 13; the compiled model is saved at the lowest IR its opset needs). The
    re-serialized graph carries no weights: they stay in the model's external data file, which
    onnxruntime reads itself, so a model past protobuf's 2 GB limit verifies too."""
    opts = session_options(level="all" if not extra else "basic")
    proto = None
    if not extra:
        try:
            return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - only the IR version is retried, anything else is re-raised
            proto = onnx.load(str(model_path), load_external_data=False)
            if proto.ir_version <= MAX_IR_VERSION:
                raise err from None
    proto = proto or onnx.load(str(model_path), load_external_data=False)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(Path(model_path).resolve().parent))
    present = {o.name for o in proto.graph.output}
    for name in extra:
        if name not in present:   # untyped: onnxruntime takes the type inference gives it (float16 models)
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def verify_models(original: Path, compiled: Path, dataset: Dataset, *, samples: int = 64,
                  layers: dict[str, dict] | None = None, layer_samples: int = 4,
                  rescales: Rescales | None = None, progress: bool = True) -> dict:
    """Compare `compiled` against `original` on up to `samples` samples of `dataset`.

    `layers` maps a quantized layer's node name to {"input": tensor, "output": tensor}
    (names present in both graphs) for the per-layer table; `rescales` holds the tensors an
    equalization divided per channel, multiplied back before comparing.
    """
    ref_sess, got_sess = _session(original), _session(compiled)
    codecs = io_quantization(compiled)
    out_names = [o.name for o in ref_sess.get_outputs()]
    got_names = {o.name for o in got_sess.get_outputs()}
    missing = [n for n in out_names if n not in got_names]
    if missing:
        raise ValueError(f"compiled model lacks outputs {missing}")
    accs = {n: ErrorStats() for n in out_names}
    lm = TokenStats() if is_causal_lm([i.name for i in ref_sess.get_inputs()],
                                      {o.name: tuple(o.shape or ()) for o in ref_sess.get_outputs()}) else None
    batch = _fixed_batch(got_sess)
    total = min(samples, dataset.num_samples)
    if batch > 1:
        total -= total % batch
    with progress_bar("verify", total, enabled=progress) as advance:
        for feed in dataset.batches(batch, limit=samples, exact=batch > 1):
            ref = ref_sess.run(out_names, feed)
            got = got_sess.run(out_names, _encode(feed, codecs))
            got = [_decode(name, g, codecs) for name, g in zip(out_names, got)]
            for name, r, g in zip(out_names, ref, got):
                accs[name].update(r, g)
            if lm is not None:
                at = out_names.index(LOGITS)
                lm.update(feed[IDS], feed.get(MASK), ref[at], got[at])
            advance(batch)
    result = {"samples": total, "data": dataset.description,
              "outputs": {n: a.summary() for n, a in accs.items()}}
    if lm is not None:
        result["task"] = lm.summary()
    if layers:
        result["layers"] = _per_layer(original, compiled, dataset, layers, layer_samples, codecs,
                                      rescales or Rescales())
    return result


def io_quantization(model_path: Path) -> dict:
    """Graph inputs/outputs a pass made integer (an int8 KV cache), from the model's metadata:
    name -> {"dtype", "scale", "shape"} (passes/kv_cache.py)."""
    import json

    proto = onnx.load(str(model_path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == "qcompile.io_quantization":
            return json.loads(prop.value)
    return {}


def _scale(codec: dict) -> np.ndarray:
    return np.asarray(codec["scale"], np.float32).reshape(codec["shape"])


def _encode(feed: dict, codecs: dict) -> dict:
    """Float data for an integer input -> its integers (round half to even, saturated)."""
    if not codecs:
        return feed
    out = {}
    for name, x in feed.items():
        codec = codecs.get(name)
        out[name] = x if codec is None else \
            np.clip(np.rint(x / _scale(codec)), -128, 127).astype(np.int8)
    return out


def _decode(name: str, x: np.ndarray, codecs: dict) -> np.ndarray:
    codec = codecs.get(name)
    return x if codec is None else x.astype(np.float32) * _scale(codec)


def _per_layer(original: Path, compiled: Path, dataset: Dataset, layers: dict[str, dict], samples: int,
               codecs: dict, rescales: Rescales) -> dict:
    both = _tensor_names(original) & _tensor_names(compiled)
    tensors = sorted({t for spec in layers.values() for t in (spec.get("input"), spec["output"]) if t in both})
    if not tensors:
        return {}
    ref_sess, got_sess = _session(original, tensors), _session(compiled, tensors)
    accs = {t: ErrorStats() for t in tensors}
    batch = _fixed_batch(got_sess)
    for feed in dataset.batches(batch, limit=max(samples, batch), exact=batch > 1):
        for t, r, g in zip(tensors, ref_sess.run(tensors, feed), got_sess.run(tensors, _encode(feed, codecs))):
            accs[t].update(r, rescales.undo(t, g))
    return layer_table(layers, accs)


def layer_table(layers: dict[str, dict], accs: dict[str, ErrorStats]) -> dict:
    """Per quantized layer: its output's SQNR and, where its input was compared too, the SQNR
    of the noise it adds on top of what reached its input."""
    table = {}
    for node, spec in layers.items():
        out = accs.get(spec["output"])
        if out is None or not out.cosines:
            continue
        inp = accs.get(spec.get("input") or "")
        entry = {"tensor": spec["output"], "sqnr_db": _round(out.sqnr_db)}
        if inp is not None and inp.cosines:
            added = out.nsr - inp.nsr
            entry["added_sqnr_db"] = _round(float(-10.0 * np.log10(added))) if added > 0 else float("inf")
        table[node] = entry
    return table
