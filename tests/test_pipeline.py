"""The pipeline: every step runs on onnx_ir's PassManager behind its instruments — timing,
dumps, range requests — a pass's user error surfaces unchanged, and each pass's `modified`
says whether the serialized model changed."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from conftest import TinyModels
from qcompile.errors import DataError
from qcompile.model_io import fix_input_shapes, load_model, set_ir_version
from qcompile.pass_context import PassContext
from qcompile.pipeline import DumpAfter, PassInstrument, PassTiming, run_pipeline
from qcompile.plan import recipe_for
from qcompile.targets import load_target

W8A8_RECIPE = """apiversion: qcompile/v1
spec:
  passes:
    - type: canonicalize
    - type: canonicalize
    - type: calibrate
      method: minmax
    - type: quantize
      speed_fallback: false
      bias_correction: true
"""


def _setup(tmp_path, recipe_text: str, data: bool = True, conv: bool = False):
    if conv:  # Conv -> BatchNormalization -> Relu: canonicalize has a BatchNorm to fold
        model, x, shape = TinyModels(0).conv_bn_relu(), TinyModels.data((3, 8, 8), 8), [1, 3, 8, 8]
    else:
        model, x, shape = TinyModels(0).mlp(), TinyModels.data((16,), 8), [1, 16]
    path, npz = TinyModels.save(model, tmp_path, "m", x)
    rpath = tmp_path / "r.yaml"
    rpath.write_text(recipe_text)
    from qcompile.calib_data import model_input_specs, open_dataset
    ir_model = load_model(path)
    dataset = open_dataset(npz, model_input_specs(ir_model)) if data else None
    fix_input_shapes(ir_model, {"x": shape})
    target = load_target("cpu:avx512_vnni")
    ctx = PassContext(target=target, data=dataset, progress=False)
    return ir_model, recipe_for(target, str(rpath)), ctx   # with the target's lowering (cpu_lower)


class Serialized(PassInstrument):
    """The model's bytes before and after each pass, beside the pass's own `modified` answer."""

    def __init__(self):
        self.rows = []

    @staticmethod
    def _bytes(model):
        set_ir_version(model)
        return ir.to_proto(model).SerializeToString()

    def before(self, index, step, model):
        self._before = self._bytes(model)

    def after(self, index, step, model, result):
        self.rows.append((step.spec.name, result.modified, self._bytes(model) != self._before))


@pytest.mark.parametrize("conv", [False, True])
def test_timing_and_modified_tell_the_truth(tmp_path, conv):
    model, recipe, ctx = _setup(tmp_path, W8A8_RECIPE, conv=conv)
    timing, truth = PassTiming(), Serialized()
    run_pipeline(model, recipe, ctx, [truth, timing])
    assert [r["pass"] for r in timing.records] == ["canonicalize", "canonicalize", "calibrate", "quantize",
                                                   "generate_kernels", "cpu_lower"]
    assert all(r["seconds"] >= 0 for r in timing.records)
    for name, said, changed in truth.rows:
        assert said == changed, f"{name}: modified={said}, serialized model changed: {changed}"
    # BatchNorm folded by the first canonicalize, nothing left for the second; calibrate only observes
    assert [said for _, said, _ in truth.rows][:4] == [conv, False, False, True]
    assert [r["modified"] for r in timing.records] == [said for _, said, _ in truth.rows]


def test_range_requests_reach_calibrate_before_it_runs(tmp_path):
    model, recipe, ctx = _setup(tmp_path, W8A8_RECIPE)
    run_pipeline(model, recipe, ctx)
    request = ctx.range_request
    # quantize asked for its static layers' inputs (and, with bias correction, their channel means)
    assert {"x", "h3"} <= set(request.tensors)
    assert request.channel_axes == {"x": -1, "h3": -1}
    assert all(ctx.stats.get(t) is not None for t in request.tensors)
    assert ctx.stats.get("x").channel_mean() is not None
    assert ctx.stats.method.method == "minmax"


def test_dump_after_writes_the_named_passes(tmp_path):
    model, recipe, ctx = _setup(tmp_path, W8A8_RECIPE)
    run_pipeline(model, recipe, ctx, [DumpAfter(frozenset({"calibrate", "quantize"}), tmp_path / "dumps")])
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["02-calibrate.onnx", "03-quantize.onnx"]
    dumped = load_model(tmp_path / "dumps" / "03-quantize.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in dumped.graph)


def test_a_pass_error_surfaces_unwrapped(tmp_path):
    """onnx_ir's PassManager wraps exceptions in PassError; the pipeline hands the user the pass's own."""
    recipe = W8A8_RECIPE.replace("    - type: calibrate\n      method: minmax\n",
                                 "    - type: gptq\n      weight: {dtype: int8, granularity: per_channel}\n"
                                 "    - type: calibrate\n")
    model, recipe, ctx = _setup(tmp_path, recipe, data=False)
    with pytest.raises(DataError, match="gptq needs calibration data"):
        run_pipeline(model, recipe, ctx)


def test_an_internal_error_keeps_its_type(tmp_path, monkeypatch):
    from qcompile.passes.calibrate import Calibrate

    def broken(self, model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Calibrate, "run", broken)
    model, recipe, ctx = _setup(tmp_path, W8A8_RECIPE)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        run_pipeline(model, recipe, ctx)
