"""ONNX's own node tests through canonicalize (and quantize where a case has a Conv/MatMul/Gemm):
every 12th case of tools/onnx_node_suite.py on every commit (the full run is in docs/passes.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import onnx_node_suite  # noqa: E402

CASES = onnx_node_suite.cases(every=12)
LAYER_CASES = onnx_node_suite.cases(only=r"^test_(conv|matmul|gemm)")


@pytest.mark.parametrize("case", CASES + LAYER_CASES, ids=lambda c: c.name)
def test_node_case_keeps_onnxruntimes_outputs(case):
    logging.disable(logging.WARNING)
    try:
        status, detail = onnx_node_suite.run_case(case)
    finally:
        logging.disable(logging.NOTSET)
    assert status != "fail", detail


def test_the_slice_runs_real_cases_and_quantizes_some():
    results = [onnx_node_suite.run_case(c) for c in LAYER_CASES]
    assert sum(s == "ok" for s, _ in results) >= 30
    assert sum(s == "ok" and "quantize (" in d and "(0 layers)" not in d for s, d in results) >= 10
