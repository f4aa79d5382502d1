"""--recipe auto (the default): the recipe follows the model's structure, the target and
whether calibration data was given (compiler/recipe_choice.py's table), never names."""

from __future__ import annotations

import json

import onnx
import pytest

from models import bert_block, llama_block
from qcompile.recipe_choice import AUTO_RECIPES, choose_recipe


@pytest.fixture(scope="module")
def builders(tmp_path_factory, small_cnn_files):
    root = tmp_path_factory.mktemp("builders")
    return {"cnn": small_cnn_files["model"], "encoder": bert_block.write(root / "bert")["model"],
            "decoder": llama_block.write(root / "llama")["model"]}


@pytest.mark.parametrize("target", ["cpu", "ascend310b"])
@pytest.mark.parametrize("family", ["cnn", "encoder", "decoder"])
@pytest.mark.parametrize("calib", [True, False])
def test_each_family_gets_its_row_of_the_table(builders, family, target, calib):
    name, why = choose_recipe(builders[family], target, calib)
    assert name == AUTO_RECIPES["ascend" if target.startswith("ascend") else "cpu"][family][0 if calib else 1]
    assert why.startswith("auto:")


def test_the_choice_does_not_depend_on_node_names(builders, tmp_path):
    model = onnx.load(str(builders["encoder"]))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    assert choose_recipe(tmp_path / "renamed.onnx", "cpu", True) == choose_recipe(builders["encoder"], "cpu", True)


def test_a_compile_without_recipe_says_what_it_chose(run_cli, tmp_path):
    files = bert_block.write(tmp_path / "bert")
    out = tmp_path / "out"
    res = run_cli([files["model"], "--calib", files["calib"], "-o", out, "--verify-samples", "2"])
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "w8a8-smooth" and "transformer encoder" in report["recipe_choice"]
    assert "recipe w8a8-smooth: auto: a transformer encoder" in " ".join(res.out.split())
