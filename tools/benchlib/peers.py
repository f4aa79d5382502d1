"""The peers: onnxruntime.quantization's quantizers as a user runs them, one catalog, each run in
a fresh measured child (`child.py peer SPEC`) so its wall time and peak RSS compare with
qcompile's CLI.

A peer = pin the non-batch input dims (models ship with dynamic dims; the batch axis stays
symbolic so one artifact serves batch 1 and 16) -> convert to opset >= 13 (per-channel QDQ
needs it) -> `quant_pre_process` -> the quantizer (`quantize_static` QDQ per-channel with a
calibration method, `quantize_dynamic`, `MatMulNBitsQuantizer` RTN/GPTQ/default, FP8 QDQ).
Each is compared with the qcompile recipes in its `versus`.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .measure import child_command, child_result, meminfo_mb, model_size_mb, run_measured, vm_hwm_mb


# ----------------------------------------------------------------------- peers
@dataclass(frozen=True)
class Peer:
    key: str
    name: str
    kind: str                       # static | dynamic | nbits | fp8
    versus: tuple[str, ...]         # the qcompile recipes this peer is compared with; ratios use the first in the run
    method: str | None = None       # quantize_static CalibrationMethod
    op_types: tuple[str, ...] | None = None
    bits: int = 4
    algo: str = "rtn"               # nbits: rtn (RTNWeightOnlyQuantConfig) | default (DefaultWeightOnlyQuantConfig)
                                    #        | gptq (GPTQWeightOnlyQuantConfig on the calibration data)
                                    #        | hqq (HQQWeightOnlyQuantConfig: asymmetric, half-quadratic)
    symmetric: bool = True          # nbits: is_symmetric (rtn, default, gptq)
    block: int = 32
    accuracy_level: int | None = None   # nbits: MatMulNBits accuracy_level (None = the quantizer's default, 0)
    transformers_only: bool = False
    smooth_alpha: float | None = None   # static: extra_options SmoothQuant=True, SmoothQuantAlpha=this
    needs_torch: bool = False       # the child must be able to import torch (not hidden even by default)
    activation_type: str = "QUInt8"     # static: QuantType of the activations (QInt8: S8S8)
    optional: bool = False          # run only when named (--peers), never by default


PEERS: tuple[Peer, ...] = (
    *(Peer(f"static-{m.lower()}", f"ort static QDQ {m}", "static", ("w8a8", "w8a8-smooth", "w8a8-cnn", "w8a8-cle"),
           method=m)
      for m in ("MinMax", "Percentile", "Entropy")),
    *(Peer(f"static-mm-{m.lower()}", f"ort static QDQ {m} [MatMul]", "static", ("w8a8", "w8a8-smooth"), method=m,
           op_types=("MatMul",), transformers_only=True)
      for m in ("MinMax", "Percentile", "Entropy")),
    # S8 activations (QInt8), as quantize_static's other activation type: only when named with --peers
    *(Peer(f"static-s8-{m.lower()}", f"ort static QDQ {m} S8", "static", ("w8a8",), method=m,
           activation_type="QInt8", optional=True)
      for m in ("MinMax", "Percentile", "Entropy")),
    # onnxruntime's own SmoothQuant (quantize_static extra option; it imports Intel neural-compressor's
    # ORTSmoothQuant, which onnxruntime does not ship): compared with qcompile w8a8-smooth.
    Peer("static-minmax-sq", "ort static QDQ MinMax SmoothQuant alpha 0.5", "static", ("w8a8-smooth", "w8a8"),
         method="MinMax", smooth_alpha=0.5, transformers_only=True),
    Peer("dynamic", "ort quantize_dynamic", "dynamic", ("w8a8-dynamic", "w8a8")),
    Peer("nbits4-rtn", "ort MatMulNBits int4 RTN b32", "nbits", ("w4a16", "w4a16-awq", "w4a16-gptq", "w8a16"),
         bits=4, algo="rtn"),
    # GPTQ as onnxruntime ships it (its vendored copy of neural-compressor's weight_only.gptq), on
    # the same calibration samples; group (MatMulNBits block) 32, symmetric, as w4a16.
    Peer("nbits4-gptq", "ort MatMulNBits int4 GPTQ b32", "nbits", ("w4a16-gptq", "w4a16-awq", "w4a16"),
         bits=4, algo="gptq", needs_torch=True),   # its util.to_numpy imports torch unconditionally
    Peer("nbits4-rtn-acc4", "ort MatMulNBits int4 RTN b32 acc4", "nbits", ("w4a8",), bits=4, algo="rtn",
         accuracy_level=4),
    Peer("nbits8", "ort MatMulNBits int8 b32", "nbits", ("w8a16",), bits=8, algo="default"),
    # FP8: onnxruntime's quantize_static refuses MinMax for float8 ("Only Distribution calibration
    # method is supported for float quantization"), so Distribution it is.
    Peer("fp8", "ort static QDQ FP8 E4M3 Distribution", "fp8", ("fp8",), method="Distribution"),
    Peer("fp8-mm", "ort static QDQ FP8 E4M3 Distribution [MatMul]", "fp8", ("fp8",), method="Distribution",
         op_types=("MatMul",), transformers_only=True),
)
PEER_BY_KEY = {p.key: p for p in PEERS}
QUICK_PEERS = ("static-minmax", "dynamic", "nbits4-rtn")


def peers_for(recipe: str) -> list[str]:
    """Names of the default peers compared with `recipe`."""
    return [p.name for p in PEERS if recipe in p.versus and not p.optional]


def prepare(src, dst, shapes: dict, opset: int = 13, *, batch_free: bool = True) -> Path:
    """Pin the input dims (axis 0 left symbolic, `batch`, when `batch_free`), drop stale
    output/value_info shapes, convert to opset >= ``opset``, infer shapes."""
    import onnx
    from onnx import version_converter

    m = onnx.load(str(src))
    names = [i.name for i in m.graph.input]
    for name, dims in shapes.items():
        if name not in names:
            raise ValueError(f"model has no input {name!r} (inputs: {names})")
        tdims = next(i for i in m.graph.input if i.name == name).type.tensor_type.shape.dim
        if len(tdims) != len(dims):
            raise ValueError(f"input {name!r} has rank {len(tdims)}, shape given {dims}")
        for axis, (d, v) in enumerate(zip(tdims, dims)):
            d.Clear()
            if axis == 0 and batch_free:
                d.dim_param = "batch"
            else:
                d.dim_value = int(v)
    for o in m.graph.output:
        for d in o.type.tensor_type.shape.dim:
            d.Clear()
    del m.graph.value_info[:]
    cur = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur < opset:
        m = version_converter.convert_version(m, opset)
    m = onnx.shape_inference.infer_shapes(m)
    onnx.save(m, str(dst))
    return Path(dst)


def activation_mb_per_sample(model_path, input_shape) -> float:
    """Sum of float activation sizes (MB) for one sample, from ONNX shape inference.

    The histogram calibrators (Percentile/Entropy) keep roughly this much per
    calibration sample in memory when run with ORT defaults.
    """
    import onnx
    with tempfile.TemporaryDirectory(prefix="qc-act-") as tmp:
        m = onnx.load(str(prepare(model_path, Path(tmp) / "m.onnx", input_shape, batch_free=False)))
    sizes = {1: 4, 10: 2, 11: 8, 16: 2}        # float, float16, double, bfloat16
    total = 0
    for vi in [*m.graph.value_info, *m.graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type in sizes and dims and all(dims):
            total += int(np.prod(dims)) * sizes[tt.elem_type]
    return total / 1e6


def auto_calib_stride(model_path, input_shape, n_calib: int, budget_mb: float | None = None) -> int | None:
    """None (= ORT defaults) if all ``n_calib`` samples' activations fit in ``budget_mb``
    (default: 35% of MemAvailable), else the largest divisor of n_calib that fits."""
    if budget_mb is None:
        mi = meminfo_mb()
        budget_mb = 0.35 * mi[1] if mi else float("inf")
    per = activation_mb_per_sample(model_path, input_shape)
    if per * n_calib <= budget_mb:
        return None
    fits = [d for d in range(1, n_calib + 1) if n_calib % d == 0 and d * per <= budget_mb]
    return max(fits, default=1)


class NpzReader:
    """CalibrationDataReader over an npz: one batch-1 sample per get_next()."""

    def __init__(self, npz, input_names):
        with np.load(npz) as z:
            keys = list(z.files)
            if set(input_names) <= set(keys):
                self.arrays = {n: z[n] for n in input_names}
            elif len(input_names) == len(keys):
                self.arrays = {n: z[k] for n, k in zip(input_names, keys)}
            else:
                raise ValueError(f"calib npz keys {keys} do not match inputs {input_names}")
        self.n = len(next(iter(self.arrays.values())))
        self.set_range(0, self.n)

    def __len__(self):
        return self.n

    def set_range(self, start_index, end_index):
        self.i, self.end = start_index, min(end_index, self.n)

    def get_next(self):
        if self.i >= self.end:
            return None
        d = {k: v[self.i:self.i + 1] for k, v in self.arrays.items()}
        self.i += 1
        return d

    def rewind(self):
        self.set_range(0, self.n)

    def __iter__(self):
        # iteration (as onnxruntime's CalibrationDataReader): what its GPTQ / SmoothQuant data loaders use
        while (d := self.get_next()) is not None:
            yield d


_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
              "ConvInteger", "MatMulNBits", "QLinearMatMul", "QLinearConv", "GatherBlockQuantized")

def _exc_text(exc: BaseException) -> str:
    """``Type: message``, plus the exception it was raised from (onnxruntime re-raises import
    failures as a bare RuntimeError, the cause says which module)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        text += f" (from {type(cause).__name__}: {cause})"
    return text


def quantize_in_child(spec: dict) -> dict:
    """Inside the fresh, measured child: prepare -> [pre_process] -> quantize; the result line."""
    import logging
    phases, warns = {}, []
    try:
        if spec.get("hide_torch", True):
            # onnxruntime.tools imports torch merely because it is installed (~1 s, ~250 MB a
            # torch-free install would not pay); the quantizers never use it.
            sys.modules.setdefault("torch", None)
        peer = Peer(**{**spec["peer"], "versus": tuple(spec["peer"]["versus"]),
                       "op_types": tuple(spec["peer"]["op_types"]) if spec["peer"].get("op_types") else None})
        t = time.perf_counter()
        import onnx
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quantize_dynamic, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        if peer.kind == "nbits":
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer,
                RTNWeightOnlyQuantConfig)
        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        phases["import_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory(prefix="child-", dir=spec.get("scratch")) as tmp:
            t = time.perf_counter()
            fixed = prepare(spec["model"], Path(tmp) / "fixed.onnx", spec["shape"])
            phases["prepare_s"] = time.perf_counter() - t
            src = fixed
            if peer.kind in ("static", "dynamic", "fp8"):
                t = time.perf_counter()
                src = Path(tmp) / "pre.onnx"
                try:
                    quant_pre_process(str(fixed), str(src))
                except Exception as exc:   # symbolic shape inference is the usual culprit
                    warns.append(f"quant_pre_process failed ({type(exc).__name__}: {exc})"[:300]
                                 + "; retried with skip_symbolic_shape=True")
                    quant_pre_process(str(fixed), str(src), skip_symbolic_shape=True)
                phases["pre_process_s"] = time.perf_counter() - t
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                if peer.kind == "static":
                    reader = NpzReader(spec["calib"], spec["inputs"])
                    extra = {"CalibStridedMinMax": spec["stride"]} if spec.get("stride") else {}
                    if peer.smooth_alpha is not None:
                        extra.update(SmoothQuant=True, SmoothQuantAlpha=peer.smooth_alpha)
                    quantize_static(str(src), spec["out"], reader, quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(peer.op_types) if peer.op_types else None,
                                    per_channel=True, activation_type=QuantType[peer.activation_type],
                                    weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod[peer.method],
                                    extra_options=extra)
                elif peer.kind == "fp8":
                    # float8 QDQ: the quantizer itself moves the model to opset 19; per-channel
                    # weight scales as qcompile's fp8 recipe uses.
                    reader = NpzReader(spec["calib"], spec["inputs"])
                    extra = {"CalibStridedMinMax": spec["stride"]} if spec.get("stride") else {}
                    quantize_static(str(src), spec["out"], reader, quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(peer.op_types) if peer.op_types else None,
                                    per_channel=True, activation_type=QuantType.QFLOAT8E4M3FN,
                                    weight_type=QuantType.QFLOAT8E4M3FN,
                                    calibrate_method=CalibrationMethod[peer.method], extra_options=extra)
                elif peer.kind == "dynamic":
                    quantize_dynamic(str(src), spec["out"], per_channel=True, weight_type=QuantType.QInt8)
                elif peer.kind == "nbits":
                    if peer.algo == "rtn":
                        cfg = RTNWeightOnlyQuantConfig()
                    elif peer.algo == "hqq":
                        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig
                        cfg = HQQWeightOnlyQuantConfig(block_size=peer.block, bits=peer.bits)
                    elif peer.algo == "gptq":
                        # block_size here is GPTQ's lazy-update block; the quantization group is the
                        # quantizer's block_size below (both 32). Defaults otherwise (percdamp 0.01,
                        # no act-order, no MSE scale search); every calibration sample is used.
                        cfg = GPTQWeightOnlyQuantConfig(
                            calibration_data_reader=NpzReader(spec["calib"], spec["inputs"]),
                            block_size=peer.block)
                    else:
                        cfg = DefaultWeightOnlyQuantConfig(block_size=peer.block, is_symmetric=peer.symmetric,
                                                           bits=peer.bits, accuracy_level=peer.accuracy_level)
                    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=peer.bits, block_size=peer.block,
                                             is_symmetric=peer.symmetric, accuracy_level=peer.accuracy_level,
                                             algo_config=cfg)
                    q.process()
                    q.model.save_model_to_file(spec["out"], False)
                else:
                    raise ValueError(f"unknown peer kind {peer.kind!r}")
            warns += sorted({str(w.message)[:200] for w in wl})[:5]
            phases["quantize_s"] = time.perf_counter() - t
        m = onnx.load(spec["out"], load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            if n.op_type in _QUANT_OPS:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return dict(phases=phases, maxrss_mb=vm_hwm_mb(), warnings=warns, quant_ops=ops)
    except BaseException as exc:  # report, do not hide
        traceback.print_exc()
        return dict(phases=phases, maxrss_mb=vm_hwm_mb(), warnings=warns, error=_exc_text(exc)[:800])


def run_peer(peer: Peer, model, calib, shapes: dict, out_path: Path, *, stride: int | None = None,
             timeout: float | None = 3600, python: str = sys.executable, hide_torch: bool = True,
             mem_limit_mb: float | None = None) -> dict:
    """One peer in a fresh measured child (`child.py peer`); never raises."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        out_path.unlink()
    log = out_path.with_suffix(f".stride{stride}.log" if stride else ".log")
    import onnx
    graph = onnx.load(str(model), load_external_data=False).graph
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    spec = dict(peer=asdict(peer), model=str(model), calib=str(calib), shape=shapes, inputs=inputs,
                out=str(out_path), stride=stride, hide_torch=hide_torch and not peer.needs_torch)
    with tempfile.TemporaryDirectory(prefix="qc-peer-") as scratch:
        spec["scratch"] = scratch
        env = dict(os.environ, TMPDIR=scratch)
        r = run_measured(child_command(python, "peer", spec), timeout=timeout, mem_limit_mb=mem_limit_mb,
                         log_path=log, env=env)
    report = child_result(r["stdout"]) or {}
    error = report.get("error") or r["error"]
    ok = r["rc"] == 0 and not error and out_path.is_file()
    if not ok and not error:
        error = "child finished without writing the output model"
    return dict(status="ok" if ok else "error", rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
                child_rss_mb=report.get("maxrss_mb"), size_mb=model_size_mb(out_path) if ok else None,
                out=str(out_path) if ok else None, phases=report.get("phases", {}),
                quant_ops=report.get("quant_ops"), warnings=report.get("warnings", []), error=error,
                log=str(log))
