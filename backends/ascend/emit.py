"""Files an Ascend compile emits beside model.onnx: atc.sh (the ATC command line for the SoC)
and model.qdq.onnx (the onnxruntime-runnable QDQ twin, as AMCT ships a fake-quant model beside
its deploy model)."""

from __future__ import annotations

import importlib.metadata
import shlex
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from qcompile.errors import UsageError

ATC_FRAMEWORK_ONNX = 5


def input_shape_arg(model: ir.Model) -> str:
    """ATC's --input_shape value ("name:d,d;name:d,d"), refusing dynamic dimensions."""
    parts, dynamic = [], {}
    for value in model.graph.inputs:
        if value.const_value is not None or value.is_initializer():
            continue
        dims = list(value.shape) if value.shape is not None else None
        bad = [i for i, d in enumerate(dims or []) if not isinstance(d, int) or d < 0] if dims is not None else None
        if dims is None or bad:
            dynamic[value.name] = (dims, bad)
            continue
        parts.append(f"{value.name}:{','.join(str(d) for d in dims)}")
    if dynamic:
        desc = "; ".join(f"{name} {[str(d) for d in dims] if dims is not None else '(no shape)'}"
                         + (f" (dynamic dims {bad})" if bad else "") for name, (dims, bad) in dynamic.items())
        example = " ".join(f"--input-shape {name}:" + ",".join(
            str(d) if isinstance(d, int) and d > 0 else "N" for d in (dims or [])) for name, (dims, _) in dynamic.items())
        raise UsageError(f"the model still has dynamic input dimensions: {desc}; ATC needs fixed shapes "
                         "(atc --input_shape) and the Ascend targets compile for one shape",
                         hint=f"pin them: {example} (N = the size you deploy with), or pass --calib data "
                              "whose arrays have the deploy shape")
    return ";".join(parts)


def atc_script(*, soc_version: str, target: str, input_shape: str, model_file: str = "model.onnx",
               opset: int | None = None, notes: list[str] = (), flags: list[str] = ()) -> str:
    output = f"model_{soc_version}"
    try:
        version = importlib.metadata.version("qcompile")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        version = "unknown"
    cmd = ["atc", f"--framework={ATC_FRAMEWORK_ONNX}", f"--model={model_file}", f"--output={output}",
           f"--soc_version={soc_version}", f"--input_shape={input_shape}", *flags]
    lines = [
        "#!/bin/sh",
        f"# ATC conversion written by qcompile {version} for target {target} (soc_version {soc_version}).",
        f"# {model_file}: ONNX opset {opset}, quantized layers as AscendQuant -> int8 Conv/MatMul/Gemm ->",
        "# AscendDequant (no QuantizeLinear/DequantizeLinear). Produces " + output + ".om next to this script.",
        "# Needs the CANN toolkit: source <CANN>/set_env.sh (atc on PATH). Extra atc flags are passed",
        "# through, e.g. ./atc.sh --log=info --precision_mode=force_fp16",
        "# The input shapes are fixed at compile time; recompile with --input-shape for another shape.",
    ]
    lines += [f"# Note: {n}" for n in notes]
    lines += ["set -e", 'cd "$(dirname "$0")"', " ".join(shlex.quote(c) for c in cmd) + ' "$@"', ""]
    return "\n".join(lines)


def model_writer(model: ir.Model) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from qcompile.model_io import save_model
        save_model(model, path)
    return write
