"""The same inputs give byte-identical outputs: two compiles in two processes with different
PYTHONHASHSEED (set and dict iteration orders differ) write the same model.onnx, the same
recipe.resolved.yaml and the same target artifacts (report.json and report.html carry timings)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models import bert_block


def _compile(model, calib, out, seed: str, *extra):
    env = {**os.environ, "PYTHONHASHSEED": seed}
    p = subprocess.run([sys.executable, "-m", "qcompile", str(model), "--calib", str(calib), "-o", str(out), "-q",
                        "--verify-samples", "2", *extra], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name not in ("report.json", "report.html")}


@pytest.mark.parametrize("case", ["cnn-cpu", "cnn-ascend", "transformer-smooth"])
def test_two_processes_with_different_hash_seeds_write_identical_files(small_cnn_files, tmp_path, case):
    files, extra = small_cnn_files, ()
    if case == "cnn-ascend":
        extra = ("--target", "ascend310b")
    if case == "transformer-smooth":
        files, extra = bert_block.write(tmp_path / "bert"), ("--recipe", "w8a8-smooth")
    first = _compile(files["model"], files["calib"], tmp_path / "a", "0", *extra)
    second = _compile(files["model"], files["calib"], tmp_path / "b", "12345", *extra)
    assert first.keys() == second.keys() and "model.onnx" in first
    assert [k for k in first if first[k] != second[k]] == []
