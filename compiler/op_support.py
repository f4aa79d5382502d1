"""Which nodes onnxruntime can run. A compile calibrates and verifies by running the model in
onnxruntime, so an op from a domain it does not implement (a custom op without its library,
or a target's deploy op such as AscendQuant) is named before any work instead of failing
deep inside calibration."""

from __future__ import annotations

import functools

import onnx_ir as ir

from .errors import ModelError, UsageError

_DEFAULT = ("", "ai.onnx")


@functools.lru_cache(maxsize=1)
def onnxruntime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) of every operator schema this onnxruntime build registers (ONNX's own, its
    contrib ops, including those it registers in the ONNX domain such as
    SimplifiedLayerNormalization); the default domain is "" here."""
    from onnxruntime.capi import _pybind_state as C
    return frozenset(("" if s.domain in _DEFAULT else s.domain, s.name) for s in C.get_all_operator_schema())


def unknown_ops(model: ir.Model) -> dict[str, list[str]]:
    """{"domain::op": [node names]} for the nodes (subgraphs included) onnxruntime has no
    schema for (asked of onnxruntime itself); ops the model defines as local functions are known."""
    functions = {(f.domain, f.name) for f in model.functions.values()}
    known = onnxruntime_ops()
    found: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain in _DEFAULT else node.domain
        if (node.domain, node.op_type) in functions or (domain, node.op_type) in known:
            continue
        found.setdefault(f"{domain or 'ai.onnx'}::{node.op_type}", []).append(node.name or "?")
    return found


def refuse_unknown_ops(model: ir.Model, path, custom_ops: tuple[str, ...]) -> None:
    """ModelError naming the ops onnxruntime cannot run, unless custom-op libraries were given
    (then onnxruntime itself says which op is still missing, when a session is made)."""
    missing = unknown_ops(model)
    if not missing or custom_ops:
        return
    op, nodes = next(iter(missing.items()))
    more = f" (and {len(missing) - 1} more op types: {', '.join(list(missing)[1:4])})" if len(missing) > 1 else ""
    if op.split("::")[1].startswith("Ascend"):
        raise ModelError(f"{path} is an Ascend deploy graph ({op} in node {nodes[0]!r}): onnxruntime cannot run "
                         "it, and it is already lowered", hint="compile the original float model, or verify "
                         "OUT/model.qdq.onnx (the Ascend compile's onnxruntime twin)")
    raise ModelError(f"{path}: node {nodes[0]!r} is {op} ({len(nodes)} node(s)), an op onnxruntime does not "
                     f"implement{more}; qcompile calibrates and verifies by running the model in onnxruntime",
                     hint="pass the op's onnxruntime custom-op library with --custom-ops LIB.so (repeatable)")


def check_custom_op_library(path) -> str:
    """The library's absolute path, after onnxruntime has loaded it once (else UsageError)."""
    import os

    import onnxruntime as ort
    if not os.path.isfile(path):
        raise UsageError(f"--custom-ops {path}: no such file")
    try:
        ort.SessionOptions().register_custom_ops_library(os.path.abspath(path))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises a plain RuntimeError/Fail
        raise UsageError(f"--custom-ops {path}: onnxruntime cannot load it as a custom-op library "
                         f"({str(err).strip().splitlines()[-1][:200]})",
                         hint="it must export RegisterCustomOps (onnxruntime's custom-op API)") from None
    return os.path.abspath(path)
