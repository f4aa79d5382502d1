"""Mixed precision under a size budget (--max-size): the per-layer choice fits the budget and
promotes by noise removed per byte; the compile honours it; an impossible budget is refused
with nothing written."""

from __future__ import annotations

import pytest

from qcompile.errors import EXIT_USAGE, UsageError
from qcompile.layers import LayerError, LayerRecord, LayerStatus, LayerTable, WeightBytes
from qcompile.mixed_precision import choose


def report(layers: dict) -> LayerTable:
    """A layer table of quantized layers: name -> (added SQNR dB, quantized bytes, float bytes)."""
    table = LayerTable()
    for n, (db, qb, fb) in layers.items():
        table.set(LayerRecord(n, "MatMul", LayerStatus.QUANTIZED, error=LayerError(f"{n}_out", db + 1.0, db),
                              weight_bytes=WeightBytes(fb, qb)))
    return table


def test_choice_promotes_by_noise_per_byte_within_the_budget():
    low = report({"a": (10.0, 100, 1600), "b": (30.0, 100, 1600), "c": (12.0, 400, 6400)})
    high = report({"a": (40.0, 200, 1600), "b": (50.0, 200, 1600), "c": (45.0, 800, 6400)})
    choice, est = choose(low, high, budget_bytes=800)
    # a removes the most noise per byte; then only b (100 more bytes) still fits, c (400 more) does not
    assert choice == {"a": "high", "b": "high", "c": "low"} and est["weight_bytes"] == 800
    choice, _ = choose(low, high, budget_bytes=700)
    assert choice == {"a": "high", "b": "low", "c": "low"}
    choice, _ = choose(low, high, budget_bytes=600)  # exactly the low scheme's bytes
    assert set(choice.values()) == {"low"}
    choice, _ = choose(low, high, budget_bytes=10_000)
    assert set(choice.values()) == {"float"}  # room for everything: float has no noise
    with pytest.raises(UsageError, match="even the low scheme"):
        choose(low, high, budget_bytes=500)


def test_size_budget_compile(tmp_path):
    from models import bert_block
    from qcompile.driver import compile_with_size_budget
    files = bert_block.write(tmp_path / "bert")
    args = dict(target="cpu", calib=files["calib"], verify_data=files["eval"], progress=False, verify_samples=16)
    result = compile_with_size_budget(files["model"], max_size_mb=0.05, output_dir=tmp_path / "out", **args)
    mp = result.report["mixed_precision"]
    assert mp["quantized_weight_mb"] <= 0.05 and mp["counts"]["high"] > 0
    for name, c in mp["layers"].items():
        want = "W[int8 per_channel]" if c == "high" else "W[int4 g32]"
        assert want in result.report["layers"][name]["scheme"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "recipe.resolved.yaml", "report.html",
                                                                                 "report.json"]


def test_impossible_size_budget_writes_nothing(tmp_path, run_cli):
    from models import bert_block
    files = bert_block.write(tmp_path / "bert")
    out = tmp_path / "out"
    res = run_cli([files["model"], "--calib", files["calib"], "-o", out, "--max-size", "0.001"])
    assert res.code == EXIT_USAGE and "even the low scheme" in res.err and not out.exists()
