"""Shared fixtures for the qcompile test suite.

* the repository root goes on sys.path so that `models` (not installed) imports;
* `small_cnn_files`: the bundled seeded CNN with its calibration and eval data;
* `run_cli`: runs `qcompile.cli.main([...])` in-process and captures exit code,
  stdout and stderr;
* `tiny`: tiny ONNX graphs built with onnx.helper (MLP, Conv->BN->Relu, Gemm
  transB=1, one activation shared by two MatMuls) plus matching input data;
* `pipeline`: load a model, pin its shapes, run a recipe's passes over it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OPSET = 17


# -- onnxruntime helpers ------------------------------------------------------------------
def ort_session(model, optimize: bool = False) -> ort.InferenceSession:
    """A CPU session over a path or a ModelProto. Graph optimizations are off unless
    `optimize` (then onnxruntime fuses QDQ groups into its int8 kernels, as deployed)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    else:
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort_session(model)
    return sess.run(None, feeds)


def ort_run_batched(model, name: str, data: np.ndarray, optimize: bool = False) -> np.ndarray:
    """Run sample by sample (works for models pinned to batch 1), stack the first output."""
    sess = ort_session(model, optimize)
    return np.concatenate([sess.run(None, {name: data[i:i + 1]})[0] for i in range(data.shape[0])])


# -- the bundled small CNN ------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_cnn_files(tmp_path_factory) -> dict[str, Path]:
    from models import small_cnn
    return small_cnn.write(tmp_path_factory.mktemp("small_cnn"))


# -- CLI in-process ---------------------------------------------------------------------------
@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str
    cwd: Path  # where a crash log (qcompile-crash.log) would have been written


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """`run_cli(args)` -> CliResult(code, out, err). Runs in a scratch cwd (`run_cli.cwd`)
    so that a crash log (qcompile-crash.log) never lands in the repository."""
    from qcompile.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # rich wraps messages at the console width, even inside long paths: use a wide one
    monkeypatch.setenv("COLUMNS", "500")

    def run(args: list) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err, cwd)

    return run


# -- tiny models ---------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, inits, name) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                                           for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class TinyModels:
    """Tiny float graphs with constant weights (seeded); `weights(model)` gives them back."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def mlp(self, d_in=16, d_hidden=32, d_out=8) -> onnx.ModelProto:
        """x -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) -> y."""
        rng = np.random.default_rng(self.seed)
        inits = {"W1": rng.standard_normal((d_in, d_hidden)) * 0.3,
                 "b1": rng.standard_normal(d_hidden) * 0.1,
                 "W2": rng.standard_normal((d_hidden, d_out)) * 0.3}
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="/fc1/MatMul"),
                 helper.make_node("Add", ["h1", "b1"], ["h2"], name="/fc1/Add"),
                 helper.make_node("Relu", ["h2"], ["h3"], name="/act/Relu"),
                 helper.make_node("MatMul", ["h3", "W2"], ["y"], name="/fc2/MatMul")]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                           inits, "mlp")

    def conv_bn_relu(self, cin=3, cout=4, hw=8) -> onnx.ModelProto:
        """x -> Conv(W, b) -> BatchNormalization -> Relu -> y."""
        rng = np.random.default_rng(self.seed)
        inits = {"W": rng.standard_normal((cout, cin, 3, 3)) * 0.3,
                 "b": rng.standard_normal(cout) * 0.1,
                 "bn_scale": rng.uniform(0.5, 1.5, cout), "bn_bias": rng.standard_normal(cout) * 0.1,
                 "bn_mean": rng.standard_normal(cout) * 0.1, "bn_var": rng.uniform(0.5, 2.0, cout)}
        nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                  ["n"], name="/bn/BatchNormalization", epsilon=1e-5),
                 helper.make_node("Relu", ["n"], ["y"], name="/relu/Relu")]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cin, hw, hw])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cout, hw, hw])],
                           inits, "conv_bn_relu")

    def gemm(self, d_in=16, d_out=8, bias_shape=None) -> onnx.ModelProto:
        """x -> Gemm(x, W[d_out, d_in], b, transB=1) -> y."""
        rng = np.random.default_rng(self.seed)
        bias_shape = (d_out,) if bias_shape is None else bias_shape
        inits = {"W": rng.standard_normal((d_out, d_in)) * 0.3,
                 "b": rng.standard_normal(bias_shape) * 0.2}
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="/fc/Gemm", transB=1)]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                           inits, "gemm")

    def shared_input(self, d_in=16, d_out=8) -> onnx.ModelProto:
        """x feeds two MatMuls (two consumers of one activation), summed."""
        rng = np.random.default_rng(self.seed)
        inits = {"Wa": rng.standard_normal((d_in, d_out)) * 0.3, "Wb": rng.standard_normal((d_in, d_out)) * 0.3}
        nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"], name="/a/MatMul"),
                 helper.make_node("MatMul", ["x", "Wb"], ["b"], name="/b/MatMul"),
                 helper.make_node("Add", ["a", "b"], ["y"], name="/sum/Add")]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                           inits, "shared_input")

    @staticmethod
    def data(shape, n: int = 64, seed: int = 1) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)

    @staticmethod
    def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    @staticmethod
    def save(model: onnx.ModelProto, folder: Path, name: str, data: np.ndarray | None = None,
             input_name: str = "x") -> tuple[Path, Path | None]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.onnx"
        onnx.save(model, path)
        npz = None
        if data is not None:
            npz = folder / f"{name}.npz"
            np.savez(npz, **{input_name: data})
        return path, npz


@pytest.fixture
def tiny() -> TinyModels:
    return TinyModels()


def compile_tiny_mlp(run_cli, tmp_path: Path, recipe_text: str) -> tuple[CliResult, Path]:
    """The CLI on the tiny MLP (4 calibration samples) with a recipe given as YAML text:
    (the result, the output folder it was asked to write)."""
    path, npz = TinyModels.save(TinyModels().mlp(), tmp_path, "m", TinyModels.data((16,), 4))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    return run_cli([path, "--target", "cpu", "--recipe", recipe, "--calib", npz, "-o", out]), out


# -- running passes directly -----------------------------------------------------------------
@pytest.fixture
def pipeline(tmp_path):
    """`pipeline(model_proto, recipe, data)` -> (ir.Model, PassContext).

    `recipe` is a built-in name or the YAML text of a recipe; `data` (one input named x)
    is the calibration set and pins dynamic shapes (batch 1), as compile_model does.
    """
    from qcompile.calib_data import model_input_specs, open_dataset, shapes_from_data
    from qcompile.pass_context import PassContext
    from qcompile.model_io import fix_input_shapes, infer_shapes, load_model
    from qcompile.pipeline import run_pipeline
    from qcompile.recipe import builtin_recipes, load_recipe
    from qcompile.targets import load_target

    counter = iter(range(10**6))

    def run(model: onnx.ModelProto, recipe: str, data: np.ndarray | None = None, *, target: str = "cpu:avx512_vnni",
            input_name: str = "x"):
        i = next(counter)
        path, npz = TinyModels.save(model, tmp_path / f"pipe{i}", "model", data, input_name)
        if recipe in builtin_recipes():
            rec = load_recipe(recipe)
        else:
            rpath = tmp_path / f"pipe{i}" / "recipe.yaml"
            rpath.write_text(recipe)
            rec = load_recipe(str(rpath))
        ir_model = load_model(path)
        dataset = open_dataset(npz, model_input_specs(ir_model)) if npz is not None else None
        if dataset is not None:
            fix_input_shapes(ir_model, shapes_from_data(dataset))
        else:
            infer_shapes(ir_model)
        ctx = PassContext(target=load_target(target), data=dataset, progress=False)
        ir_model = run_pipeline(ir_model, rec, ctx)
        return ir_model, ctx

    return run


def to_proto(ir_model) -> onnx.ModelProto:
    """An ir.Model as a ModelProto onnxruntime (IR <= 13) reads."""
    import onnx_ir as ir
    from qcompile.model_io import set_ir_version

    set_ir_version(ir_model)
    return ir.to_proto(ir_model)
