"""The float-preserving passes keep onnxruntime's outputs on random graphs: a fast slice of
tools/fuzz_passes.py's seeds (the full run, 1,000 graphs, is in docs/passes.md). The checker
itself is checked: a quantizing pipeline on the same graphs is caught."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz_passes  # noqa: E402
from models.random_graphs import build, minimise, random_spec  # noqa: E402

SLICE = range(0, 40)


@pytest.mark.parametrize("seed", SLICE)
def test_float_preserving_passes_keep_the_outputs(seed):
    assert fuzz_passes.check(seed) == []


def test_the_checker_catches_a_pass_that_changes_values(monkeypatch):
    monkeypatch.setitem(fuzz_passes.CASES, "w8a8", ["canonicalize", "calibrate", "quantize"])
    monkeypatch.setitem(fuzz_passes._OPTIONS, "quantize", "\n      speed_fallback: false")
    problems = [fuzz_passes.run_case(random_spec(seed), "w8a8") for seed in range(3)]
    assert all(p is not None and "outputs differ" in p for p in problems), problems


def test_minimise_drops_every_block_the_failure_does_not_need():
    spec = random_spec(5)
    spec.blocks = ["act", "conv", "act", "act"] if spec.kind == "image" else ["act", "linear", "act", "act"]
    key = spec.blocks[1]
    small = minimise(spec, lambda s: key in s.blocks)
    assert small.blocks == [key]
    build(small)  # still a valid graph
