"""The accuracy budget (--max-loss) and automatic fallback: the search returns the best
model and a log of every trial, even when the budget cannot be met; fallback ranks layers by
measured error or by activation range; bad budgets and counts are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import TinyModels
from qcompile.budget import Budget, parse_budget
from qcompile.driver import compile_with_budget
from qcompile.errors import EXIT_RECIPE, EXIT_USAGE, UsageError


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    """The seeded BERT block (models/bert_block.py): W8A8 loses accuracy on it layer by layer."""
    from models import bert_block
    return bert_block.write(tmp_path_factory.mktemp("bert"))


def _args(files):
    return dict(target="cpu:avx512_vnni", calib=files["calib"], verify_data=files["eval"], progress=False,
                verify_samples=16)


def test_budget_falls_back_until_it_holds_and_logs_every_trial(bert_files, tmp_path):
    first = compile_with_budget(bert_files["model"], budget=Budget("sqnr", -100.0), max_trials=1,
                                output_dir=tmp_path / "easy", **_args(bert_files))
    start = first.report["budget"]["value"]
    target = start + 4.0  # reachable only by keeping some layers float
    result = compile_with_budget(bert_files["model"], budget=Budget("sqnr", target), max_trials=12,
                                 output_dir=tmp_path / "out", **_args(bert_files))
    b = result.report["budget"]
    assert b["met"] and b["value"] >= target
    trials = b["trials"]
    assert trials[0]["change"] == "recipe as written" and trials[0]["metric"] == pytest.approx(start)
    kept = trials[b["best_trial"]]
    assert kept["excluded"], "the budget was only reachable with fallbacks"
    for name in kept["excluded"]:
        assert result.report["layers"][name]["status"] == "float"
    # the winner is the fewest-fallback trial that met the budget
    met = [t for t in trials if t["metric"] is not None and t["metric"] >= target]
    assert kept["quantized_layers"] == max(t["quantized_layers"] for t in met)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["budget"]["trials"] == trials
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "recipe.resolved.yaml", "report.html",
                                                                                 "report.json"]
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))
    # later trials reuse the first compile's calibration
    assert any("reused" in str(t) for t in [result.report.get("calibrate", {})])


def test_unreachable_budget_still_returns_the_best_model(bert_files, tmp_path):
    result = compile_with_budget(bert_files["model"], budget=Budget("sqnr", 500.0), max_trials=3,
                                 output_dir=tmp_path / "out", **_args(bert_files))
    b = result.report["budget"]
    assert not b["met"] and len(b["trials"]) == 3
    assert b["value"] == max(t["metric"] for t in b["trials"] if t["metric"] is not None)
    assert (tmp_path / "out" / "model.onnx").exists()
    assert any("not met" in w for w in result.report["warnings"])


@pytest.mark.parametrize("text,words", [("accuracy>=0.9", ["unknown metric", "cosine", "sqnr"]),
                                        ("cosine<0.9", ["METRIC>=VALUE"]), ("cosine>=2", ["[-1, 1]"])])
def test_bad_budgets_are_usage_errors_before_any_work(tmp_path, run_cli, tiny, text, words):
    with pytest.raises(UsageError):
        parse_budget(text)
    path, npz = TinyModels.save(tiny.mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    out = tmp_path / "out"
    res = run_cli([path, "--calib", npz, "-o", out, "--max-loss", text])
    assert res.code == EXIT_USAGE and not out.exists()
    for w in words:
        assert w in res.err


def test_parse_budget():
    assert parse_budget("cosine>=0.995") == Budget("cosine", 0.995)
    assert parse_budget(" sqnr >= 30 ") == Budget("sqnr", 30.0)


def _fallback_recipe(tmp_path, rank_by: str, n: int) -> str:
    path = tmp_path / f"fb-{rank_by}-{n}.yaml"
    path.write_text("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: fuse\n"
                    "    - type: calibrate\n"
                    "      method: minmax\n    - type: quantize\n      speed_fallback: false\n"
                    f"      fallback: {{max_layers: {n}, rank_by: {rank_by}}}\n")
    return str(path)


def test_fallback_by_error_keeps_the_noisiest_layers_float(bert_files, tmp_path):
    from qcompile.driver import compile_model
    plain = compile_model(bert_files["model"], recipe="w8a8", output_dir=tmp_path / "plain", **_args(bert_files))
    result = compile_model(bert_files["model"], recipe=_fallback_recipe(tmp_path, "error", 3),
                           output_dir=tmp_path / "fb", **_args(bert_files))
    fb = result.report["fallback"]
    noisiest = sorted((r["error"]["added_sqnr_db"], n) for n, r in plain.report["layers"].items()
                      if r.get("status") == "quantized" and isinstance(r.get("error", {}).get("added_sqnr_db"), float))
    assert fb["layers"] == [n for _, n in noisiest[:3]]
    for name in fb["layers"]:
        assert result.report["layers"][name]["status"] == "float"
        assert "fallback" in result.report["layers"][name]["reason"]
    assert fb["sqnr_db_after"] > fb["sqnr_db_before"]


def test_fallback_by_range_uses_activation_statistics(bert_files, tmp_path):
    from qcompile.driver import compile_model
    result = compile_model(bert_files["model"], recipe=_fallback_recipe(tmp_path, "range", 2),
                           output_dir=tmp_path / "fb", **_args(bert_files))
    reasons = {n: r["reason"] for n, r in result.report["layers"].items() if "fallback" in r.get("reason", "")}
    assert len(reasons) == 2 and all("max|x|/std" in r for r in reasons.values())


def test_fallback_count_beyond_the_layers_is_a_recipe_error(tmp_path, run_cli, tiny):
    path, npz = TinyModels.save(tiny.mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    out = tmp_path / "out"
    res = run_cli([path, "--calib", npz, "-o", out, "--recipe", _fallback_recipe(tmp_path, "range", 5)])
    assert res.code == EXIT_RECIPE and "fallback.max_layers" in res.err and "only 2 layers" in res.err
    assert not out.exists()


def test_range_measure_is_max_over_std():
    from qcompile.observers import HistogramObserver
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    x[0] = 40.0
    obs = HistogramObserver()
    obs.update(x)
    assert obs.range_measure() == pytest.approx(40.0 / x.std(), rel=0.02)


def test_budget_trials_over_an_error_fallback_recipe_keep_their_own_exclusions(bert_files, tmp_path):
    """--max-loss on a recipe with `fallback: {rank_by: error}`: every trial keeps the layers it
    excludes float on top of the recipe's own fallback, and reuses the first trial's calibration.
    (At ce084b6 the fallback dropped a trial's exclusions, overrides and statistics, so every
    trial compiled the same model.)"""
    result = compile_with_budget(bert_files["model"], recipe=_fallback_recipe(tmp_path, "error", 1),
                                 budget=Budget("sqnr", 500.0), max_trials=6, output_dir=tmp_path / "out",
                                 **_args(bert_files))
    trials = result.report["budget"]["trials"]
    assert [t["change"] for t in trials[1:4]] == [f"calibrate.method = {m}" for m in ("percentile", "entropy", "mse")]
    falls = trials[4:]
    assert [len(t["excluded"]) for t in falls] == [1, 3]
    # the recipe's own fallback keeps one more layer float in each trial
    assert falls[0]["quantized_layers"] == trials[0]["quantized_layers"] - 1
    assert falls[1]["quantized_layers"] == trials[0]["quantized_layers"] - 3
    assert len({t["metric"] for t in falls} | {trials[0]["metric"]}) == 3
    best = trials[result.report["budget"]["best_trial"]]
    for name in best["excluded"]:
        assert result.report["layers"][name]["status"] == "float"
    assert result.report["calibrate"].get("reused"), "trials reuse the first trial's activation statistics"
