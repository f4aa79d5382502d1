"""Every user mistake: the documented exit code, a short message on stderr without a
traceback, and nothing left behind (no output files, no staging directories)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from models import small_cnn
from qcompile.errors import (EXIT_DATA, EXIT_MODEL, EXIT_OUTPUT, EXIT_RECIPE, EXIT_USAGE)

MAX_MESSAGE_LINES = 3  # the message, its hint, and at most one more line


def assert_clean_failure(res, code: int, out_dir, *, mentions: tuple[str, ...] = (),
                         max_lines: int = MAX_MESSAGE_LINES):
    """`res` is a CliResult from the run_cli fixture (see conftest)."""
    assert res.code == code, f"exit {res.code}, expected {code}; stderr:\n{res.err}"
    assert "Traceback" not in res.err and "Traceback" not in res.out
    assert res.err.startswith("error:"), res.err
    assert len(res.err.strip().splitlines()) <= max_lines, res.err
    flat = " ".join(res.err.split())  # undo rich's line wrapping
    for word in mentions:
        assert word in flat, f"{word!r} not in {flat!r}"
    # nothing written: no output directory (or only what was there before), no staging dirs
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())
    parent = out_dir.parent
    if parent.is_dir():
        assert not [p for p in parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp-")]
    assert not (res.cwd / "qcompile-crash.log").exists()


@pytest.fixture
def work(tmp_path, small_cnn_files):
    """A scratch folder with copies of the small CNN and its data, and an output path."""
    folder = tmp_path / "work"
    folder.mkdir()
    paths = {k: folder / p.name for k, p in small_cnn_files.items()}
    for k, p in small_cnn_files.items():
        shutil.copy(p, paths[k])
    paths["out"] = tmp_path / "out"
    paths["dir"] = folder
    return paths


def compile_args(work, model=None, calib="default", extra=()):
    args = [model or work["model"]]
    calib = work["calib"] if calib == "default" else calib
    if calib is not None:
        args += ["--calib", calib]
    return [*args, "-o", work["out"], "-q", *extra]


# -- the model ------------------------------------------------------------------------------------
def test_truncated_model(run_cli, work):
    data = work["model"].read_bytes()
    bad = work["dir"] / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    res = run_cli(compile_args(work, bad))
    assert_clean_failure(res, EXIT_MODEL, work["out"], mentions=("truncated.onnx",))


@pytest.mark.parametrize("cut", [0.1, 0.33, 0.9, 0.99])
def test_model_cut_anywhere(run_cli, work, cut):
    data = work["model"].read_bytes()
    bad = work["dir"] / "cut.onnx"
    bad.write_bytes(data[: int(len(data) * cut)])
    assert_clean_failure(run_cli(compile_args(work, bad)), EXIT_MODEL, work["out"])


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(4096),
                                     b"this is a text file, not an ONNX model\n" * 20])
def test_not_an_onnx_file(run_cli, work, content):
    bad = work["dir"] / "bad.onnx"
    bad.write_bytes(content)
    res = run_cli(compile_args(work, bad))
    assert_clean_failure(res, EXIT_MODEL, work["out"], mentions=("bad.onnx",))


def test_missing_model(run_cli, work):
    res = run_cli(compile_args(work, work["dir"] / "nope.onnx"))
    assert_clean_failure(res, EXIT_MODEL, work["out"], mentions=("nope.onnx",))


def test_model_is_a_directory(run_cli, work):
    res = run_cli(compile_args(work, work["dir"]))
    assert_clean_failure(res, EXIT_MODEL, work["out"])


def test_missing_external_data(run_cli, work):
    ext = work["dir"] / "ext"
    ext.mkdir()
    model = onnx.load(work["model"])
    onnx.save(model, ext / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert (ext / "m.onnx.data").exists()
    (ext / "m.onnx.data").unlink()
    res = run_cli(compile_args(work, ext / "m.onnx"))
    assert_clean_failure(res, EXIT_MODEL, work["out"], mentions=("m.onnx.data",))


def test_truncated_external_data(run_cli, work):
    ext = work["dir"] / "ext2"
    ext.mkdir()
    onnx.save(onnx.load(work["model"]), ext / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    data = (ext / "m.onnx.data").read_bytes()
    (ext / "m.onnx.data").write_bytes(data[: len(data) // 2])
    assert_clean_failure(run_cli(compile_args(work, ext / "m.onnx")), EXIT_MODEL, work["out"])


# -- the recipe -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("passes,mentions", [
    ("- type: canonicalize\n    - type: quantise", ("quantise", "spec.passes[1].type")),
    ("- type: calibrate\n      methd: minmax\n    - type: quantize", ("pass 'calibrate'", "key 'methd'")),
    ('- type: calibrate\n      percentile: "high"\n    - type: quantize', ("pass 'calibrate'", "key 'percentile'")),
    ("- type: calibrate\n      samples: 1.5\n    - type: quantize", ("key 'samples'",)),
    ("- type: quantize\n    - type: calibrate", ("pass 'quantize'", "ranges")),
])
def test_bad_recipe(run_cli, work, passes, mentions):
    recipe = work["dir"] / "bad_recipe.yaml"
    recipe.write_text(f"apiversion: qcompile/v1\nspec:\n  passes:\n    {passes}\n")
    res = run_cli(compile_args(work, extra=("--recipe", recipe)))
    assert_clean_failure(res, EXIT_RECIPE, work["out"], mentions=("bad_recipe.yaml", *mentions))


def test_invalid_yaml_recipe(run_cli, work):
    recipe = work["dir"] / "broken.yaml"
    recipe.write_text("spec: {passes: [type: calibrate\n")
    res = run_cli(compile_args(work, extra=("--recipe", recipe)))
    # the YAML parser's own report (position plus a source excerpt with a caret) follows
    assert_clean_failure(res, EXIT_RECIPE, work["out"], mentions=("broken.yaml", "line"), max_lines=8)


def test_unknown_recipe_name(run_cli, work):
    res = run_cli(compile_args(work, extra=("--recipe", "w3a3")))
    assert_clean_failure(res, EXIT_RECIPE, work["out"], mentions=("w3a3",))


# -- calibration / verification data -----------------------------------------------------------------------
def _calib(work, name, **arrays):
    path = work["dir"] / name
    np.savez(path, **arrays)
    return path


def _images(n=4):
    from models import small_cnn
    return small_cnn.images(n, 5)


@pytest.mark.parametrize("case,mentions", [
    ("wrong_name", ("'y'",)),
    ("wrong_rank", ("rank",)),
    ("wrong_dtype", ("float64",)),
    ("wrong_size", ("16",)),
    ("nan", ("NaN",)),
    ("inf", ("Inf",)),
    ("extra_input", ("'z'",)),
])
def test_bad_calibration_data(run_cli, work, case, mentions):
    x = _images()
    arrays = {
        "wrong_name": {"y": x},
        "wrong_rank": {"x": x[:, 0]},
        "wrong_dtype": {"x": x.astype(np.float64)},
        "wrong_size": {"x": x[:, :, :16, :16]},
        "nan": {"x": np.where(np.arange(x.size).reshape(x.shape) == 777, np.nan, x).astype(np.float32)},
        "inf": {"x": np.where(np.arange(x.size).reshape(x.shape) == 1234, -np.inf, x).astype(np.float32)},
        "extra_input": {"x": x, "z": x},
    }[case]
    path = _calib(work, f"{case}.npz", **arrays)
    res = run_cli(compile_args(work, calib=path))
    assert_clean_failure(res, EXIT_DATA, work["out"], mentions=(f"{case}.npz", *mentions))


def test_calibration_data_not_an_npz(run_cli, work):
    path = work["dir"] / "calib.npz.txt"
    path.write_text("not numpy\n")
    res = run_cli(compile_args(work, calib=path))
    assert_clean_failure(res, EXIT_DATA, work["out"])


def test_missing_calibration_data(run_cli, work):
    res = run_cli(compile_args(work, calib=work["dir"] / "nope.npz"))
    assert_clean_failure(res, EXIT_DATA, work["out"], mentions=("nope.npz",))


def test_bad_verification_data_fails_after_the_model_was_built(run_cli, work):
    """Verification runs last, after the model is staged: nothing may reach OUT."""
    path = _calib(work, "verify_f64.npz", x=_images().astype(np.float64))
    res = run_cli(compile_args(work, extra=("--verify-data", path)))
    assert_clean_failure(res, EXIT_DATA, work["out"], mentions=("verify_f64.npz",))


def test_failed_run_leaves_an_existing_output_directory_untouched(run_cli, work):
    out = work["out"]
    assert run_cli(compile_args(work, extra=("--verify-samples", "2"))).code == 0  # a previous compile's output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    path = _calib(work, "nan2.npz", x=np.full((2, 3, small_cnn.SIZE, small_cnn.SIZE), np.nan, np.float32))
    res = run_cli(compile_args(work, calib=path))
    assert res.code == EXIT_DATA and "Traceback" not in res.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


# -- output directory -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("under", ["", "a/b"])
def test_output_under_a_regular_file(run_cli, work, under):
    blocker = work["dir"] / "a_file"
    blocker.write_text("I am a file")
    out = blocker / under / "out" if under else blocker / "out"
    res = run_cli([work["model"], "--calib", work["calib"], "-o", out, "-q"])
    assert_clean_failure(res, EXIT_OUTPUT, out, mentions=("out",))
    assert blocker.read_text() == "I am a file"


def test_output_is_an_existing_file(run_cli, work):
    target = work["dir"] / "out_file"
    target.write_text("x")
    res = run_cli([work["model"], "--calib", work["calib"], "-o", target, "-q"])
    assert res.code == EXIT_OUTPUT and "Traceback" not in res.err and res.err.startswith("error:")
    assert target.read_text() == "x"
    assert not [p for p in work["dir"].iterdir() if ".tmp-" in p.name]


# -- command line ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["tpu", "cpu:avx9000"])
def test_unknown_target(run_cli, work, target):
    res = run_cli(compile_args(work, extra=("--target", target)))
    assert_clean_failure(res, EXIT_USAGE, work["out"], mentions=(target.split(":")[-1],))


@pytest.mark.parametrize("spec", ["x:1,3,a,32", "1,3,32,32", "x:1,3,32,0", "x:", ":1,3,32,32", "x:1,3,-32,32"])
def test_bad_input_shape_string(run_cli, work, spec):
    res = run_cli(compile_args(work, extra=("--input-shape", spec)))
    assert_clean_failure(res, EXIT_USAGE, work["out"], mentions=("--input-shape",))


@pytest.mark.parametrize("spec,mentions", [
    ("y:1,3,32,32", ("'y'",)),              # no such input
    ("x:1,3,32", ("rank",)),                # wrong rank
    ("x:1,4,32,32", ("dimension 1",)),      # contradicts a fixed dimension
])
def test_input_shape_that_does_not_fit_the_model(run_cli, work, spec, mentions):
    res = run_cli(compile_args(work, extra=("--input-shape", spec)))
    assert_clean_failure(res, EXIT_USAGE, work["out"], mentions=mentions)


def test_unknown_option(run_cli, work):
    res = run_cli(compile_args(work, extra=("--calibrate-harder",)))
    assert res.code == EXIT_USAGE
    assert "Traceback" not in res.err and not work["out"].exists()


def test_no_arguments(run_cli):
    res = run_cli([])
    assert res.code == EXIT_USAGE and "Traceback" not in res.err


def test_verify_with_a_missing_model(run_cli, work):
    res = run_cli(["verify", work["model"], work["dir"] / "missing.onnx", "--data", work["eval"]])
    assert res.code == EXIT_MODEL and "Traceback" not in res.err and "missing.onnx" in res.err


def test_verify_with_bad_data(run_cli, work):
    path = _calib(work, "v_nan.npz", x=np.full((2, 3, small_cnn.SIZE, small_cnn.SIZE), np.nan, np.float32))
    res = run_cli(["verify", work["model"], work["model"], "--data", path])
    assert res.code == EXIT_DATA and "Traceback" not in res.err and "NaN" in res.err
    assert not (res.cwd / "qcompile-crash.log").exists()


@pytest.mark.parametrize("n", ["0", "-5"])
def test_verify_samples_must_be_positive(run_cli, work, n):
    res = run_cli(compile_args(work, extra=(f"--verify-samples={n}",)))
    assert_clean_failure(res, EXIT_USAGE, work["out"], mentions=("--verify-samples",))
    assert "Warning" not in res.err


def test_verify_subcommand_samples_must_be_positive(run_cli, work):
    res = run_cli(["verify", work["model"], work["model"], "--data", work["eval"], "--samples", "0"])
    assert res.code == EXIT_USAGE and "Traceback" not in res.err
    assert not (res.cwd / "qcompile-crash.log").exists()


def test_dump_after_unknown_pass(run_cli, work):
    res = run_cli(compile_args(work, extra=("--no-verify", "--dump-after", "quantise")))
    assert_clean_failure(res, EXIT_USAGE, work["out"], mentions=("quantise",))


def test_calibration_folder_of_images_says_what_it_holds(run_cli, work):
    folder = work["dir"] / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    res = run_cli(compile_args(work, calib=folder))
    assert_clean_failure(res, EXIT_DATA, work["out"], mentions=("no .npz", ".jpg", ".png", "np.savez"))


def test_truncated_external_data_is_named(run_cli, work, tmp_path):
    model = onnx.load(str(work["model"]))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    res = run_cli(compile_args(work, tmp_path / "ext.onnx"))
    assert_clean_failure(res, EXIT_MODEL, work["out"], mentions=("ext.onnx.data", "truncated", "ends at byte 1000"))


def test_calibration_folder_with_mixed_shapes_names_the_odd_file(run_cli, work):
    folder = work["dir"] / "mixed"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((2, 3, small_cnn.SIZE, small_cnn.SIZE), np.float32))
    np.savez(folder / "b.npz", x=np.zeros((2, 3, small_cnn.SIZE // 2, small_cnn.SIZE // 2), np.float32))
    res = run_cli(compile_args(work, calib=folder))
    assert_clean_failure(res, EXIT_DATA, work["out"], mentions=("b.npz",))


def test_a_recipe_that_is_not_yaml(run_cli, work):
    bad = work["dir"] / "bad.yaml"
    bad.write_text("spec: [unclosed\n  - a: b: c")
    res = run_cli(compile_args(work, extra=("--recipe", bad)))
    assert_clean_failure(res, EXIT_RECIPE, work["out"], mentions=("bad.yaml", "not valid YAML at line 2"))
