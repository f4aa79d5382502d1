"""awq: the scaling leaves float outputs unchanged, the search never does worse than no
scaling, and the result beats round-to-nearest W4A16 on inputs with a few large channels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TinyModels, compile_tiny_mlp, to_proto
from test_smooth_quant import block_model, outlier_data, smooth_recipe


def awq_recipe(**options) -> str:
    return smooth_recipe().replace("smooth_quant", "awq") + "".join(f"      {k}: {v}\n" for k, v in options.items())


def test_scaling_without_clipping_keeps_float_outputs(pipeline):
    model = block_model()
    data = outlier_data()
    ir_model, ctx = pipeline(model, awq_recipe(clip="false", **{"weight": "{granularity: per_group, group_size: 8, dtype: int4}"}), data)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(to_proto(ir_model).SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(4):
        for a, b in zip(ref.run(None, {"x": data[i:i + 1]}), got.run(None, {"x": data[i:i + 1]})):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    groups = ctx.reports["awq"]["groups"]
    assert groups["ln"]["status"] == "scaled" and groups["ln"]["error_after"] <= groups["ln"]["error_before"]


def test_awq_beats_round_to_nearest_w4a16(tmp_path):
    from test_schemes import compile_tiny, run
    rng = np.random.default_rng(4)
    model = TinyModels(0).mlp(64, 32, 8)
    data = rng.standard_normal((128, 64)).astype(np.float32)
    data[:, [3, 17, 40]] *= 25.0  # a few channels carry most of the activation
    rtn, _, _ = compile_tiny(tmp_path, model, "w4a16", data, name="rtn")
    awq, _, report = compile_tiny(tmp_path, model, "w4a16-awq", data, name="awq")
    (ref,) = run(model, {"x": data})
    err = lambda m: float(np.sum((run(m, {"x": data})[0] - ref) ** 2))  # noqa: E731
    assert err(awq) < 0.8 * err(rtn)
    rec = report["awq"]["groups"]["x"]
    assert rec["error_after_clip"] < rec["error_before"]


@pytest.mark.parametrize("option,key", [("min_clip: 0", "min_clip"), ("weight: {granularity: per_channel}", "weight"),
                                        ("alpha_steps: 0", "alpha_steps")])
def test_bad_awq_options_are_recipe_errors(tmp_path, run_cli, option, key):
    res, out = compile_tiny_mlp(run_cli, tmp_path, awq_recipe() + f"      {option}\n")
    assert res.code == 4 and f"key '{key}'" in res.err and not out.exists(), res.err
