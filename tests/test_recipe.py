"""Recipes: built-ins load; every mistake is a RecipeError naming file, pass and key."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from qcompile.errors import EXIT_RECIPE, RecipeError
from qcompile.observers import RANGE_METHODS
from qcompile.recipe import builtin_recipes, load_recipe

HEADER = "apiversion: qcompile/v1\nmetadata: {name: test}\nspec:\n  passes:\n"


def write_recipe(tmp_path, passes_yaml: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(HEADER + textwrap.indent(textwrap.dedent(passes_yaml).strip() + "\n", "    "))
    return path


def load_error(path) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert info.value.exit_code == EXIT_RECIPE
    return info.value


# -- built-ins --------------------------------------------------------------------------------------
def test_builtin_recipes_are_listed_and_load():
    names = builtin_recipes()
    assert {"w8a8", "w8a16"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.steps
        assert all(step.origin == "recipe" for step in recipe.steps)


def test_w8a8_builtin_contents():
    recipe = load_recipe("w8a8")
    assert [s.spec.name for s in recipe.steps] == ["canonicalize", "fuse", "calibrate", "quantize"]
    cal, quant = recipe.steps[2].config, recipe.steps[3].config
    assert cal.method in RANGE_METHODS and 50.0 < cal.percentile <= 100.0
    assert quant.weight.dtype == "int8" and quant.weight.granularity == "per_channel" and quant.weight.symmetric
    assert quant.activation is not None and quant.activation.symmetric == "auto"  # cpu resolves it to asymmetric uint8


def test_w8a16_is_weight_only():
    recipe = load_recipe("w8a16")
    assert [s.spec.name for s in recipe.steps] == ["canonicalize", "fuse", "quantize"]
    quant = recipe.steps[2]
    assert quant.config.activation is None
    assert quant.spec.cls.needs(quant.config) == set()


def test_activation_null_gives_weight_only_config_without_calibrate(tmp_path):
    path = write_recipe(tmp_path, """
        - type: quantize
          activation: null
          weight: {granularity: per_tensor}
    """)
    recipe = load_recipe(str(path))
    (step,) = recipe.steps
    assert step.config.activation is None
    assert step.config.weight.granularity == "per_tensor"
    assert step.config.weight.dtype == "int8"  # default filled in


# -- located errors ----------------------------------------------------------------------------------
def test_unknown_pass(tmp_path):
    path = write_recipe(tmp_path, """
        - type: canonicalize
        - type: quantise
    """)
    err = load_error(path)
    text = str(err)
    assert str(path) in text
    assert "quantise" in text
    assert "spec.passes[1].type" in text
    assert err.hint and "quantize" in err.hint  # the hint lists the real passes


@pytest.mark.parametrize("pass_yaml,pass_name,key", [
    ("- type: calibrate\n  methd: minmax", "calibrate", "methd"),
    ("- type: canonicalize\n  fuse_bn: true", "canonicalize", "fuse_bn"),
    ("- type: quantize\n  activation: null\n  excludes: ['/head/*']", "quantize", "excludes"),
])
def test_unknown_key(tmp_path, pass_yaml, pass_name, key):
    assert_located(tmp_path, pass_yaml, pass_name, key)


def assert_located(tmp_path, pass_yaml: str, pass_name: str, key: str) -> None:
    """The recipe error names the file, the pass and the key, in its text and its fields."""
    path = write_recipe(tmp_path, pass_yaml)
    err = load_error(path)
    text = str(err)
    assert str(path) in text and f"pass '{pass_name}'" in text and f"key '{key}'" in text
    assert (err.file, err.pass_name, err.key) == (str(path), pass_name, key)


@pytest.mark.parametrize("pass_yaml,pass_name,key", [
    ('- type: calibrate\n  percentile: "high"', "calibrate", "percentile"),
    ("- type: calibrate\n  samples: 1.5", "calibrate", "samples"),
    ("- type: calibrate\n  samples: true", "calibrate", "samples"),
    ("- type: calibrate\n  method: median", "calibrate", "method"),
    ("- type: calibrate\n- type: quantize\n  fold_activations: \"yes\"", "quantize", "fold_activations"),
    ("- type: quantize\n  activation: null\n  include: '/fc*'", "quantize", "include"),
    ("- type: quantize\n  activation: null\n  op_types: [Conv, Relu]", "quantize", "op_types[1]"),
    ("- type: quantize\n  activation: null\n  weight: int8", "quantize", "weight"),
])
def test_wrong_type(tmp_path, pass_yaml, pass_name, key):
    assert_located(tmp_path, pass_yaml, pass_name, key)


@pytest.mark.parametrize("pass_yaml,key", [
    ("- type: quantize\n  activation: null\n  weight: {bits: 4}", "weight.bits"),
    ("- type: quantize\n  activation: null\n  weight: {dtype: int3}", "weight.dtype"),
    # under an optional mapping (activation: ActivationScheme | None) the inner key is still named
    ("- type: calibrate\n- type: quantize\n  activation: {dtype: auto, symmetric: maybe}", "activation.symmetric"),
    ("- type: calibrate\n- type: quantize\n  activation: {bits: 8}", "activation.bits"),
])
def test_bad_nested_key(tmp_path, pass_yaml, key):
    path = write_recipe(tmp_path, pass_yaml)
    err = load_error(path)
    assert str(path) in str(err) and "pass 'quantize'" in str(err) and f"key '{key}'" in str(err)
    assert err.key == key


@pytest.mark.parametrize("pass_yaml,key", [
    ("- type: calibrate\n  percentile: 40", "percentile"),
    ("- type: calibrate\n  samples: 0", "samples"),
    ("- type: calibrate\n  bins: 16", "bins"),
])
def test_out_of_range_values(tmp_path, pass_yaml, key):
    err = load_error(write_recipe(tmp_path, pass_yaml))
    assert err.pass_name == "calibrate" and err.key == key and f"key '{key}'" in str(err)


def test_pass_ordered_before_what_it_needs(tmp_path):
    path = write_recipe(tmp_path, """
        - type: canonicalize
        - type: quantize
        - type: calibrate
    """)
    err = load_error(path)
    text = str(err)
    assert str(path) in text and "pass 'quantize'" in text
    assert "ranges" in text  # what is missing
    assert err.hint and "calibrate" in err.hint  # what to put before it


@pytest.mark.parametrize("equalizer", ["smooth_quant", "equalize_outputs", "gptq", "cle", "awq"])
def test_a_pass_changing_the_float_model_after_calibrate_is_an_order_error(tmp_path, run_cli, equalizer,
                                                                           small_cnn_files):
    """It would leave quantize with stale ranges: refused before any work, both passes named."""
    path = write_recipe(tmp_path, f"""
        - type: canonicalize
        - type: calibrate
        - type: {equalizer}
        - type: quantize
    """)
    err = load_error(path)
    text = str(err)
    assert f"pass '{equalizer}'" in text and "'calibrate'" in text and "ranges" in text
    assert err.pass_name == equalizer and err.hint == f"put {equalizer} before calibrate"
    out = tmp_path / "out"
    res = run_cli([small_cnn_files["model"], "--recipe", path, "-o", out])   # refused before the model is read
    assert res.code == EXIT_RECIPE and f"pass '{equalizer}'" in res.err and not out.exists()


def test_a_weight_algorithm_after_quantize_is_an_order_error(tmp_path):
    path = write_recipe(tmp_path, """
        - type: canonicalize
        - type: quantize
          activation: null
        - type: gptq
    """)
    err = load_error(path)
    assert err.pass_name == "gptq" and "'quantize'" in str(err) and "qdq" in str(err)


def test_every_builtin_recipe_is_in_contract_order():
    """The facts each step needs are given by an earlier step, none is invalidated after it is given."""
    from qcompile.facts import Fact

    for name in builtin_recipes():
        given: set = set()
        for step in load_recipe(name).steps:
            assert step.spec.cls.needs(step.config) <= given, (name, step.spec.name)
            assert not step.spec.cls.invalidates(step.config) & given, (name, step.spec.name)
            given |= step.spec.cls.gives(step.config)
        assert Fact.CANONICAL in given, name


def test_weight_only_quantize_needs_no_calibrate(tmp_path):
    path = write_recipe(tmp_path, """
        - type: quantize
          activation: null
        - type: canonicalize
    """)
    assert [s.spec.name for s in load_recipe(str(path)).steps] == ["quantize", "canonicalize"]


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: [calibrate\n      method: minmax\n")
    err = load_error(path)
    assert str(path) in str(err) and "YAML" in str(err)


@pytest.mark.parametrize("text,key", [
    ("apiversion: qcompile/v1\nspec: {passes: [{type: canonicalize}]}\nextra: 1\n", "extra"),
    ("apiversion: qcompile/v1\nspec: {passes: [{type: canonicalize}], steps: []}\n", "spec.steps"),
    ("apiversion: qcompile/v2\nspec: {passes: [{type: canonicalize}]}\n", "apiversion"),
    ("apiversion: qcompile/v1\nspec: {passes: []}\n", "spec.passes"),
    ("apiversion: qcompile/v1\nspec: {passes: [{method: minmax}]}\n", "spec.passes[0]"),
])
def test_bad_recipe_structure(tmp_path, text, key):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    err = load_error(path)
    assert str(path) in str(err) and err.key == key and f"key '{key}'" in str(err)


def test_missing_recipe_file_and_unknown_name(tmp_path):
    err = load_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err)
    with pytest.raises(RecipeError) as info:
        load_recipe("w9a9")
    assert "w9a9" in str(info.value) and "w8a8" in (info.value.hint or "")


# -- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["w8a8", "w8a16", "custom"])
def test_to_dict_round_trip_loads_again(tmp_path, source):
    if source == "custom":
        source = str(write_recipe(tmp_path, """
            - type: canonicalize
              gemm: to_matmul_add
            - type: calibrate
              method: entropy
              samples: 16
            - type: quantize
              include: ['/a/*', '/b/*']
              exclude: ['/b/skip*']
              op_types: [MatMul]
              weight: {dtype: int8, granularity: per_tensor, symmetric: true, reduce_range: true}
              activation: {dtype: uint8, symmetric: false}
              fold_activations: false
        """, name="custom.yaml"))
    recipe = load_recipe(source)
    data = recipe.to_dict()
    again_path = tmp_path / "again.yaml"
    again_path.write_text(yaml.safe_dump(data, sort_keys=False))
    again = load_recipe(str(again_path))
    assert [s.spec.name for s in again.steps] == [s.spec.name for s in recipe.steps]
    assert [s.config for s in again.steps] == [s.config for s in recipe.steps]
    assert again.name == recipe.name and again.description == recipe.description
    # a second round trip is a fixed point
    assert again.to_dict()["spec"] == data["spec"]
