"""The layer-wise compile (`--max-memory`): block partitions from the graph's structure, the
block-by-block activation stream and verification against the whole-model ones, the
activation cache and the weight spill, a compile under a cap checked by its peak RSS in a
subprocess, and the errors a too-small cap or a full disk give."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import llama_block, llama_scale
from qcompile.activation_cache import ActivationCache
from qcompile.blocks import partition_blocks
from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.driver import compile_model
from qcompile.errors import OutputError, UsageError
from qcompile.memory_plan import MemoryPlan, memory_needed
from qcompile.model_io import load_model
from qcompile.passes.activation_stream import stream_tensors
from qcompile.weight_store import derived_tensor, stored_tensor, weight_spill

LAYERS = 4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> dict:
    """A 4-layer float32 llama_block (about 150 KB of weights per layer)."""
    return llama_block.write(tmp_path_factory.mktemp("decoder"), layers=LAYERS, calib_samples=8, eval_samples=6)


def _layer_of(value_name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", value_name)
    return int(m.group(1)) if m else None


def _sublayer_of(value_name: str) -> str | None:
    """`3.self_attn` / `3.mlp` for a layer's projection weights (the test may read names; the
    partition does not)."""
    m = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp)\.", value_name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _one_layer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if _layer_of(v.name) == 0)


def test_blocks_cut_a_decoder_on_its_residual_stream(decoder):
    """Between an attention and an MLP, or two layers, only the residual stream and the
    tensors every layer reads (mask, rotary tables) are alive: the cuts go there, never
    through a sublayer."""
    model = load_model(decoder["model"])
    partition = partition_blocks(model, int(_one_layer_bytes(model) * 1.5))
    blocks = partition.blocks
    order = [n for b in blocks for n in b.nodes]
    assert sorted(map(id, order)) == sorted(map(id, model.graph))          # every node once
    seen: set = set(model.graph.inputs) | set(model.graph.initializers.values())
    for node in order:                                                     # in a topological order
        assert all(v is None or v in seen for v in node.inputs), node.name
        seen.update(node.outputs)
    sublayers_in = [{_sublayer_of(v.name) for n in b.nodes for v in n.inputs if v is not None and v.const_value is not None}
                    - {None} for b in blocks]
    owner = {}
    for i, sublayers in enumerate(sublayers_in):
        for sublayer in sublayers:
            assert owner.setdefault(sublayer, i) == i, f"{sublayer}'s weights are split across blocks"
    assert len(owner) == 2 * LAYERS and len(blocks) >= LAYERS
    # between layers only the residual stream, the mask and the rotary tables cross
    assert max(len(b.inputs) for b in blocks) <= 4, [b.inputs for b in blocks]
    produced_before: set[str] = set()
    for b in blocks:
        assert set(b.inputs) <= produced_before            # a block reads only what earlier blocks made
        produced_before |= b.produced()
    graph_outputs = {v.name for v in model.graph.outputs}
    assert graph_outputs <= {o for b in blocks for o in b.outputs}


def test_a_cap_below_one_weight_says_what_one_block_needs(decoder):
    model = load_model(decoder["model"])
    with pytest.raises(UsageError) as err:
        partition_blocks(model, 1024)
    assert "reads 128.0 KiB of weights" in str(err.value) and "at least" in err.value.hint


def _stream(model, names, dataset, memory):
    values = {out.name: out for node in model.graph for out in node.outputs}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    counted = 0
    for arrays, n in stream_tensors(model, [values[n] for n in names], dataset, samples=8, label="t",
                                    progress=False, memory=memory):
        counted += n
        for name, array in arrays.items():
            got[name].append(array)
    return got, counted


def test_the_blockwise_stream_gives_the_whole_model_streams_tensors(decoder, tmp_path):
    model = load_model(decoder["model"])
    dataset = open_dataset(decoder["calib"], model_input_specs(model))
    names = sorted(n.outputs[0].name for n in model.graph if n.op_type == "MatMul")
    whole, n_whole = _stream(model, names, dataset, None)
    memory = MemoryPlan(memory_needed(int(_one_layer_bytes(model) * 1.2)), tmp_path / "scratch")
    assert len(partition_blocks(model, memory.block_bytes).blocks) > LAYERS
    blockwise, n_blocks = _stream(model, names, dataset, memory)
    assert n_whole == n_blocks == 8                       # each sample counted once
    for name in names:
        assert len(whole[name]) == len(blockwise[name]) == 8
        for a, b in zip(whole[name], blockwise[name]):
            np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").rglob("*.npy"))


def test_a_sequential_stream_runs_each_block_on_the_blocks_before_it_as_rewritten(decoder, tmp_path):
    """GPTQ's sequential order: what the caller writes into a block while it holds that
    block's tensors is what the later blocks run on — checked against the whole-model stream
    of a model with the same rewrite made beforehand."""
    from qcompile.passes.activation_stream import tensor_groups
    model = load_model(decoder["model"])
    dataset = open_dataset(decoder["calib"], model_input_specs(model))
    linears = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    xs = list({n.inputs[0].name: n.inputs[0] for n in linears}.values())
    memory = MemoryPlan(memory_needed(int(_one_layer_bytes(model) * 1.2)), tmp_path / "scratch")

    def halve(m, x_names):   # what "rounding" the layers reading x_names does here
        for node in m.graph:
            if node.op_type == "MatMul" and node.inputs[0].name in x_names and node.inputs[1].const_value is not None:
                node.inputs[1].const_value = ir.tensor(node.inputs[1].const_value.numpy() * np.float32(0.5))

    got, first = {}, None
    for arrays, finished in tensor_groups(stream_tensors(model, xs, dataset, samples=8, label="t", progress=False,
                                                         memory=memory, sequential=True)):
        if finished and first is None:
            first = set(finished)
            halve(model, first)
        for name, array in arrays.items():
            got.setdefault(name, []).append(array)
    assert first and len(first) < len(xs)

    plain, rewritten = load_model(decoder["model"]), load_model(decoder["model"])
    halve(rewritten, first)
    want_first, _ = _stream(plain, sorted(first), dataset, None)              # the block before its rewrite
    want_rest, _ = _stream(rewritten, sorted(set(got) - first), dataset, None)
    for name, arrays in {**want_first, **want_rest}.items():
        assert len(got[name]) == 8
        for a, b in zip(got[name], arrays):
            np.testing.assert_array_equal(a, b, err_msg=name)
    changed = [n for n in want_rest if not np.allclose(_stream(plain, [n], dataset, None)[0][n][0], got[n][0])]
    assert changed                                                           # the rewrite did reach later blocks


def test_sequential_gptq_follows_the_rounded_blocks_under_a_cap(decoder, tmp_path):
    model = load_model(decoder["model"])
    cap = memory_needed(int(_one_layer_bytes(model) * 1.2))
    common = dict(recipe="w4a16-gptq", calib=decoder["calib"], verify_data=decoder["eval"], progress=False,
                  max_memory=cap)
    plain = compile_model(decoder["model"], output_dir=tmp_path / "plain", **common)
    seq = compile_model(decoder["model"], output_dir=tmp_path / "seq", settings=("gptq.sequential=true",), **common)
    assert seq.report["gptq"]["sequential"] is True and plain.report["gptq"]["sequential"] is False
    a, b = _initializers(tmp_path / "plain" / "model.onnx"), _initializers(tmp_path / "seq" / "model.onnx")
    differ = [n for n in a if not np.array_equal(a[n], b[n])]
    assert differ and any(".layers.0." not in n for n in differ)
    whole = compile_model(decoder["model"], output_dir=tmp_path / "whole", settings=("gptq.sequential=true",),
                          **{**common, "max_memory": None})
    assert whole.report["gptq"]["sequential"] is False
    assert any("gptq.sequential takes effect block by block" in w for w in whole.report["warnings"])


def _initializers(path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))   # external data next to it is loaded
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("recipe", ["w8a8-smooth", "w4a16-gptq", "w4a16-awq", "w8a8-kv8"])
def test_a_layerwise_compile_writes_and_verifies_what_the_whole_model_compile_does(decoder, tmp_path, recipe):
    """Every pass that reads activations, run block by block: the same tensors, the same numbers."""
    model = load_model(decoder["model"])
    cap = memory_needed(int(_one_layer_bytes(model) * 1.2))
    common = dict(recipe=recipe, calib=decoder["calib"], verify_data=decoder["eval"], progress=False)
    whole = compile_model(decoder["model"], output_dir=tmp_path / "whole", **common)
    layered = compile_model(decoder["model"], output_dir=tmp_path / "layered", max_memory=cap, **common)
    assert layered.report["memory"]["blocks"] > LAYERS
    assert (tmp_path / "layered" / "model.onnx.data").exists()            # weights written tensor by tensor
    assert not (tmp_path / "layered" / ".scratch").exists()
    got, ref = _initializers(tmp_path / "layered" / "model.onnx"), _initializers(tmp_path / "whole" / "model.onnx")
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    nodes = lambda p: [(n.op_type, list(n.input), list(n.output)) for n in onnx.load(str(p), load_external_data=False).graph.node]  # noqa: E731
    assert nodes(tmp_path / "layered" / "model.onnx") == nodes(tmp_path / "whole" / "model.onnx")
    a, b = layered.report["verification"], whole.report["verification"]
    assert a["layer_wise"] is True
    assert a["outputs"] == b["outputs"] and a["task"] == b["task"] and a["layers"] == b["layers"]
    assert len(a["layers"]) == len(layered.layers.quantized())


def test_the_activation_cache_spills_past_its_budget_and_reads_back(tmp_path):
    cache = ActivationCache(1000, tmp_path / "cache")
    small, big = np.arange(100, dtype=np.float32), np.arange(1000, dtype=np.float32)
    cache.put(0, "a", small)
    cache.put(0, "b", big)                      # past the budget: a file
    assert cache.in_memory == small.nbytes and cache.on_disk == big.nbytes
    np.testing.assert_array_equal(cache.get(0, "b"), big)
    cache.keep_only({"a"})
    assert cache.on_disk == 0 and not list((tmp_path / "cache").glob("*.npy"))
    cache.clear()
    assert not (tmp_path / "cache").exists()


def test_a_full_disk_while_caching_says_how_much_was_needed(tmp_path, monkeypatch):
    cache = ActivationCache(0, tmp_path / "cache")
    cache.put(0, "a", np.zeros(256, np.float32))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OutputError) as err:
        cache.put(1, "a", np.zeros(512, np.float32))
    assert "needed at least" in str(err.value) and "0.00 GB" in str(err.value)
    assert not (tmp_path / "cache").exists()          # cleaned up


def test_the_weight_spill_keeps_big_new_weights_on_disk_and_derived_ones_lazy(tmp_path):
    big = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)   # 1.4 MB
    scale = np.linspace(0.5, 2.0, 600)
    assert isinstance(stored_tensor(big, "w"), ir.Tensor)                  # no spill: in memory
    with weight_spill(tmp_path / "spill") as spill:
        stored = stored_tensor(big, "w")
        small = stored_tensor(big[:10], "s")
        derived = derived_tensor(stored, lambda w: (w * scale[:, None]).astype(np.float32), "w_scaled")
        assert isinstance(stored, ir.ExternalTensor) and spill.bytes >= big.nbytes
        assert isinstance(small, ir.Tensor)
        assert isinstance(derived, ir.LazyTensor)
        np.testing.assert_array_equal(stored.numpy(), big)
        np.testing.assert_array_equal(derived.numpy(), (big * scale[:, None]).astype(np.float32))
        assert spill.tensors == 1                                          # the derived weight is not stored


def test_a_too_small_max_memory_is_refused_before_any_work(run_cli, decoder, tmp_path):
    res = run_cli([decoder["model"], "--max-memory", "lots", "-o", tmp_path / "o", "-q"])
    assert res.code == 2 and "--max-memory 'lots'" in res.err
    res = run_cli([decoder["model"], "--max-memory", "0.1", "-o", tmp_path / "o", "-q"])
    assert res.code == 2 and "below what any compile needs" in res.err
    assert not (tmp_path / "o").exists()


_RSS_PROBE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_a_compile_under_a_cap_stays_under_it(tmp_path):
    """llama_scale's `ci` decoder (236 MB float16, 472 MB once widened) under --max-memory 1.2:
    several blocks, and the compile's peak RSS, measured by the kernel for the child process,
    stays under the cap."""
    files = llama_scale.write(tmp_path / "ci", "ci", calib=4, evaluation=2, seq=64)
    cap_gb = 1.2
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qcompile", str(files["model"]), "--recipe", "w8a8", "--calib", str(files["calib"]),
           "--verify-data", str(files["eval"]), "--max-memory", str(cap_gb), "-o", str(out), "-q"]
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, *cmd], capture_output=True, text=True, timeout=900)
    code, peak = (int(x) for x in probe.stdout.split()[-2:])
    assert code == 0, probe.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["memory"]["blocks"] >= 4
    assert report["verification"]["layer_wise"] is True
    assert peak < cap_gb * 1e9, f"peak RSS {peak / 1e9:.2f} GB over the {cap_gb} GB cap"


@pytest.mark.parametrize("builder,recipe", [("small_cnn", "w8a8-cnn"), ("bert_block", "w8a8-smooth")])
def test_other_graphs_compile_layerwise_to_the_same_model(tmp_path, builder, recipe):
    """A CNN (Conv/BN/residual branches) and an encoder (LayerNorm, GELU, attention with a mask)
    cut into blocks: the same tensors as the whole-model compile."""
    import importlib
    files = importlib.import_module(f"models.{builder}").write(tmp_path / builder)
    sizes = [t.nbytes for t in _initializers(files["model"]).values()]
    cap = max(sum(sizes) // 4, int(1.2 * max(sizes)))   # a quarter of the model, or what its largest layer needs
    common = dict(recipe=recipe, calib=files["calib"], verify_data=files["eval"], progress=False)
    whole = compile_model(files["model"], output_dir=tmp_path / "whole", **common)
    layered = compile_model(files["model"], output_dir=tmp_path / "layered", max_memory=memory_needed(cap), **common)
    assert layered.report["memory"]["blocks"] >= 2
    got, ref = _initializers(tmp_path / "layered" / "model.onnx"), _initializers(tmp_path / "whole" / "model.onnx")
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert layered.report["verification"]["outputs"] == whole.report["verification"]["outputs"]


def test_qcompile_verify_takes_max_memory_and_gives_the_same_numbers(run_cli, decoder, tmp_path):
    compile_model(decoder["model"], recipe="w8a8", calib=decoder["calib"], output_dir=tmp_path / "out",
                  progress=False, verify=False)
    got = {}
    for mode, extra in (("whole", []), ("blocks", ["--max-memory", "1"])):
        res = run_cli(["verify", decoder["model"], tmp_path / "out" / "model.onnx", "--data", decoder["eval"],
                       "--json", tmp_path / f"{mode}.json", *extra])
        assert res.code == 0, res.err
        got[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert got["blocks"]["layer_wise"] is True
    assert got["blocks"]["outputs"] == got["whole"]["outputs"] and got["blocks"]["task"] == got["whole"]["task"]
